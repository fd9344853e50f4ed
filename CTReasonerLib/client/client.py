"""``CTReasonerClient``: what Slicer (or any Python) uses to talk to the backend. Standard library + numpy only.

Typical use::

    client = CTReasonerClient.local(model="Resources/Models/CTReasoner-Tiny")   # or .ssh(host) / .http(url, token)
    client.connect()                        # handshake + version check, waits for the model to load
    image_id = client.set_image(hu_slice, ijk_to_ras=matrix, k=42, window=(40, 400))
    reply = client.chat(image_id, "segment the liver")
    reply.result.masks[0].mask              # (H, W) bool in the slice pixel frame
    reply.geometry.pixel_to_ras([[x, y]])   # where that pixel is in 3D
    call = client.run_in_background(client.chat, image_id, "and the spleen?", callback=on_done)
    call.cancel()
    client.close()                          # ends the backend process tree it started

Blocking methods raise ``ServerError`` (with ``.code`` from ``spec.ErrorCode``), ``CallTimeoutError`` or
``ServerConnectionError``. Callbacks and progress handlers run on a worker thread; GUI code must marshal
them to its own thread (Slicer: ``qt.QTimer.singleShot(0, ...)``).
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .. import __version__ as CLIENT_VERSION
from ..errors import CTReasonerError
from ..results import BoxPrediction, ChatResult, CloserLookInfo, MaskPrediction
from .encoding import PayloadError, decode_mask, decode_probability, encode_array, encode_mask
from .geometry import SliceGeometry
from .spec import (JOB_METHODS, PROGRESS_NOTIFICATION, PROTOCOL_VERSION, ErrorCode, versions_compatible)
from .transports import (HttpTransport, RequestTooLargeError, StdioTransport, Transport, TransportError,
                         local_server_command, ssh_server_command)

log = logging.getLogger(__name__)

ProgressHandler = Callable[[int, int, str], None]
StateHandler = Callable[[str, str], None]


class ServerError(CTReasonerError):
    """The server answered a call with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None):
        hint = data.get("hint", "") if isinstance(data, dict) else ""
        super().__init__(message, hint)
        self.code = code
        self.data = data


class VersionMismatchError(ServerError):
    """Client and server speak incompatible protocol versions."""


class CallCancelledError(ServerError):
    """The call was cancelled before it finished."""


class ServerConnectionError(CTReasonerError):
    """The server could not be reached or went away."""


class CallTimeoutError(CTReasonerError):
    """The server did not answer within the time allowed."""


@dataclass
class SliceReply:
    """A chat or closer-look answer: the decoded result plus where the slice sits in 3D."""
    image_id: str
    geometry: SliceGeometry
    result: ChatResult


@dataclass
class RefineReply:
    image_id: str
    geometry: SliceGeometry
    mask: MaskPrediction
    timings_ms: Dict[str, float] = field(default_factory=dict)


@dataclass
class PropagationReply:
    """Per-slice masks of a 3D propagation; ``masks[k]`` is the (H, W) bool mask on slice k."""
    volume_id: str
    organ: Optional[str]
    masks: Dict[int, np.ndarray]
    scores: Dict[int, float]
    ijk_to_ras: np.ndarray
    stopped: str
    timings_ms: Dict[str, float] = field(default_factory=dict)


class _PendingRequest:
    def __init__(self, method: str, generation: int, on_progress: Optional[ProgressHandler]):
        self.method = method
        self.generation = generation
        self.on_progress = on_progress
        self.event = threading.Event()
        self.result: Any = None
        self.error: Optional[dict] = None
        self.lost: Optional[str] = None


class BackgroundCall:
    """Handle of a call running on the client's worker thread."""

    def __init__(self, client: "CTReasonerClient", future: Future, job_id: str):
        self._client = client
        self.future = future
        self.job_id = job_id

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: Optional[float] = None):
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel a queued call, or ask the server to cancel the running job."""
        if self.future.cancel():
            return True
        try:
            return self._client.cancel(self.job_id)
        except CTReasonerError:
            return False


def _server_error(error: dict) -> ServerError:
    code = int(error.get("code", ErrorCode.INTERNAL_ERROR))
    message = str(error.get("message", "unknown server error"))
    data = error.get("data")
    if code == ErrorCode.VERSION_MISMATCH:
        return VersionMismatchError(code, message, data)
    if code == ErrorCode.CANCELLED:
        return CallCancelledError(code, message, data)
    return ServerError(code, message, data)


class CTReasonerClient:
    """A connection to one backend, with handshake, heartbeat, automatic reconnect and background calls."""

    UPLOADS_KEPT = 16
    RECONNECT_ATTEMPTS = 8

    def __init__(self, transport_factory: Callable[[], Transport], timeout: float = 300.0,
                 connect_timeout: float = 180.0, heartbeat_interval: float = 15.0, ping_timeout: float = 10.0,
                 auto_reconnect: bool = True, reconnect_window: float = 30.0, max_retries: int = 2,
                 on_state: Optional[StateHandler] = None,
                 client_name: str = "CTReasonerLib.client"):
        self._transport_factory = transport_factory
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.heartbeat_interval = heartbeat_interval
        self.ping_timeout = ping_timeout
        self.auto_reconnect = auto_reconnect
        self.reconnect_window = reconnect_window
        self.max_retries = max_retries
        self.on_state = on_state
        self.client_name = client_name
        self.server_info: Dict[str, Any] = {}
        self._transport: Optional[Transport] = None
        self._generation = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._reconnect_lock = threading.RLock()
        self._model_was_ready = False
        self._pending: Dict[int, _PendingRequest] = {}
        self._jobs: Dict[str, _PendingRequest] = {}
        # What was uploaded, so it can be re-sent when the server lost it (restart, idle timeout, eviction).
        self._uploads: "collections.OrderedDict[str, Tuple[str, dict]]" = collections.OrderedDict()
        self._geometries: Dict[str, SliceGeometry] = {}
        self._last_activity = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ctreasoner-call")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def local(cls, python: Optional[str] = None, model: Optional[str] = None, device: str = "auto",
              extra_args: Sequence[str] = (), env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
              **kwargs) -> "CTReasonerClient":
        """A backend subprocess started with ``python`` (default: this interpreter)."""
        command = local_server_command(python, model, device, extra_args)
        return cls(lambda: StdioTransport(command, env=env, cwd=cwd), **kwargs)

    @classmethod
    def ssh(cls, host: str, remote_command: str = "ctreasoner serve --stdio", ssh: str = "ssh",
            ssh_options: Sequence[str] = (), **kwargs) -> "CTReasonerClient":
        """A backend on a remote (GPU) machine, reached as ``ssh HOST ctreasoner serve --stdio``."""
        command = ssh_server_command(host, remote_command, ssh, ssh_options)
        return cls(lambda: StdioTransport(command), **kwargs)

    @classmethod
    def http(cls, url: str, token: Optional[str] = None, token_file: Optional[str] = None,
             **kwargs) -> "CTReasonerClient":
        """A running HTTP backend (``ctreasoner serve --http``), authenticated with a bearer token."""
        if token is None and token_file:
            try:
                with open(token_file, "r", encoding="utf-8") as handle:
                    token = handle.read().strip()
            except OSError as exc:
                raise CTReasonerError(f"cannot read the token file {token_file}: {exc}",
                                      "pass the file given to 'ctreasoner serve --token-file'") from None
        return cls(lambda: HttpTransport(url, token), **kwargs)

    # ----------------------------------------------------------------- connection
    def _set_state(self, state: str, detail: str = "") -> None:
        log.info("backend %s%s", state, f": {detail}" if detail else "")
        if self.on_state is not None:
            try:
                self.on_state(state, detail)
            except Exception:  # a GUI callback must never break the connection logic
                log.exception("on_state callback failed")

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.alive and bool(self.server_info)

    @property
    def neighbour_distance_mm(self) -> Optional[float]:
        """How far either side of a slice the server's model reads its neighbours (``set_image(neighbours=...)``),
        in mm; None when it reads none or its model has not loaded yet (``connect`` waits for it)."""
        model = self.server_info.get("model")
        distance = model.get("neighbour_distance_mm") if isinstance(model, dict) else None
        return None if distance is None else float(distance)

    def connect(self, wait_for_model: bool = True) -> Dict[str, Any]:
        """Start/reach the server and shake hands. Returns the ``initialize`` result.

        With ``wait_for_model`` it also waits (up to ``connect_timeout``) until the model has loaded.
        """
        if self._closed.is_set():
            raise ServerConnectionError("this client was closed", "create a new CTReasonerClient")
        with self._reconnect_lock:
            if not self.connected:
                self._open()
        if wait_for_model:
            self.wait_for_model()
        if self._heartbeat is None and self.heartbeat_interval > 0:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                               name="ctreasoner-heartbeat")
            self._heartbeat.start()
        return self.server_info

    def _open(self) -> None:
        """(Re)open the transport and run the handshake. Caller holds ``_reconnect_lock``."""
        self._drop_transport()
        self._set_state("connecting")
        with self._lock:
            self._generation += 1
            generation = self._generation
        transport = self._transport_factory()
        try:
            transport.start(self._on_message, lambda reason: self._on_lost(generation, reason))
        except TransportError as exc:
            raise ServerConnectionError(str(exc), "check the Python executable / host / URL settings") from None
        self._transport = transport
        try:
            self._handshake()
        except Exception:
            self._drop_transport()
            raise
        self._set_state("ready", transport.describe())

    def _handshake(self) -> None:
        info = self._request("initialize", {"protocol_version": PROTOCOL_VERSION,
                                            "client": {"name": self.client_name, "version": CLIENT_VERSION}},
                             timeout=self.connect_timeout)
        server_protocol = str(info.get("protocol_version", "?"))
        try:
            compatible = versions_compatible(PROTOCOL_VERSION, server_protocol)
        except ValueError:
            compatible = False
        if not compatible:
            raise VersionMismatchError(
                ErrorCode.VERSION_MISMATCH,
                f"protocol version mismatch: this client speaks {PROTOCOL_VERSION}, "
                f"the server speaks {server_protocol}",
                {"hint": "install the same CTReasoner version on both sides"})
        if isinstance(self._transport, HttpTransport):
            self._transport.session_id = info.get("session_id")
        self._transport.max_request_bytes = (info.get("capabilities") or {}).get("max_request_bytes")
        self.server_info = info

    def wait_for_model(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Poll ``ping`` until the model is loaded; raise the server's load error if loading failed."""
        deadline = time.monotonic() + (self.connect_timeout if timeout is None else timeout)
        delay = 0.05
        while True:
            status = self.ping()
            state = status.get("model_state")
            if state == "ready":
                # initialize may have answered while loading; keep the full model description
                self.server_info.update(model=status.get("model", {}), model_state=state)
                self._model_was_ready = True
                return status
            if state == "failed":
                raise ServerError(ErrorCode.MODEL_NOT_LOADED, f"the server could not load its model: "
                                  f"{status.get('model_error', 'unknown error')}",
                                  {"hint": "run 'ctreasoner serve --check' on the server machine"})
            if time.monotonic() > deadline:
                raise CallTimeoutError(f"the model did not finish loading within {timeout or self.connect_timeout:.0f} s",
                                       "check the backend log; large models on CPU load slowly")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _drop_transport(self) -> None:
        transport, self._transport = self._transport, None
        self.server_info = {}
        if transport is not None:
            transport.close()

    def _reconnect(self, failed_generation: int) -> None:
        """Open a fresh connection, retrying with back-off for up to ``reconnect_window`` seconds
        (a restarting server needs a moment before it accepts connections again)."""
        with self._reconnect_lock:
            if self._generation != failed_generation and self.connected:
                return  # another thread already reconnected
            deadline = time.monotonic() + self.reconnect_window
            delay = 0.2
            for attempt in range(self.RECONNECT_ATTEMPTS):
                if self._closed.is_set():
                    raise ServerConnectionError("this client was closed", "create a new CTReasonerClient")
                self._set_state("reconnecting", f"attempt {attempt + 1}")
                try:
                    self._open()
                    if self._model_was_ready:
                        # resume where the caller was: a restarted backend first reloads its model
                        self.wait_for_model()
                    return
                except ServerConnectionError:
                    if attempt + 1 == self.RECONNECT_ATTEMPTS or time.monotonic() + delay > deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def close(self, shutdown_server: bool = True) -> None:
        """Stop the heartbeat, ask a server we started to shut down, and end its whole process tree."""
        if self._closed.is_set():
            return
        self._closed.set()
        if shutdown_server and self.connected:
            try:
                self._request("shutdown", {}, timeout=2.0)
            except CTReasonerError:
                pass
        with self._reconnect_lock:
            self._drop_transport()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._set_state("closed")

    def __enter__(self) -> "CTReasonerClient":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- messages
    def _on_message(self, message: dict) -> None:
        self._last_activity = time.monotonic()
        if "method" in message:  # a notification (the server sends no requests)
            if message.get("method") == PROGRESS_NOTIFICATION:
                self._on_progress(message.get("params") or {})
            return
        with self._lock:
            pending = self._pending.pop(message.get("id"), None)
        if pending is None:
            if "error" in message:
                log.warning("server error without a matching call: %s", message["error"])
            return
        if "error" in message:
            pending.error = message["error"] if isinstance(message["error"], dict) else {"message": str(message)}
        else:
            pending.result = message.get("result")
        pending.event.set()

    def _on_progress(self, params: dict) -> None:
        with self._lock:
            pending = self._jobs.get(params.get("job_id"))
        if pending is not None and pending.on_progress is not None:
            try:
                pending.on_progress(int(params.get("done", 0)), int(params.get("total", 0)),
                                    str(params.get("message", "")))
            except Exception:
                log.exception("progress callback failed")

    def _on_lost(self, generation: int, reason: str) -> None:
        with self._lock:
            if generation != self._generation:
                return
            lost = [p for p in self._pending.values() if p.generation == generation]
            for pending in lost:
                pending.lost = reason
                pending.event.set()
        if not self._closed.is_set():
            self._set_state("lost", reason)

    def _request(self, method: str, params: dict, timeout: Optional[float] = None,
                 on_progress: Optional[ProgressHandler] = None) -> Any:
        """One JSON-RPC call on the current transport, without recovery."""
        transport = self._transport
        if transport is None or not transport.alive:
            raise ServerConnectionError("not connected to the backend", "call connect() first")
        request_id = next(self._ids)
        pending = _PendingRequest(method, self._generation, on_progress)
        job_id = params.get("job_id")
        with self._lock:
            self._pending[request_id] = pending
            if job_id:
                self._jobs[job_id] = pending
        timeout = self.timeout if timeout is None else timeout
        try:
            transport.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            self._last_activity = time.monotonic()
            if not pending.event.wait(timeout):
                if job_id:
                    self._send_cancel_quietly(job_id)
                raise CallTimeoutError(f"the server did not answer '{method}' within {timeout:g} s",
                                       "the machine may be busy or the model slow on this device; "
                                       "raise the client timeout or check the backend log")
        except TransportError as exc:
            raise ServerConnectionError(f"lost the connection to the backend: {exc}") from None
        except RequestTooLargeError as exc:
            raise ServerError(ErrorCode.PAYLOAD_TOO_LARGE, f"'{method}' not sent: {exc}",
                              {"hint": "send one slice or an ROI crop, or raise the server's --max-request-mb"}) from None
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
                if job_id:
                    self._jobs.pop(job_id, None)
        if pending.lost is not None:
            raise ServerConnectionError(f"the backend went away during '{method}': {pending.lost}",
                                        "the client reconnects automatically on the next call")
        if pending.error is not None:
            raise _server_error(pending.error)
        return pending.result

    def _send_cancel_quietly(self, job_id: str) -> None:
        transport = self._transport
        if transport is not None and transport.alive:
            try:
                transport.send({"jsonrpc": "2.0", "id": next(self._ids), "method": "cancel",
                                "params": {"job_id": job_id}})
            except TransportError:
                pass

    def call(self, method: str, params: Optional[dict] = None, timeout: Optional[float] = None,
             on_progress: Optional[ProgressHandler] = None) -> Any:
        """Blocking call with recovery: reconnect when the server went away, re-initialize an expired
        session, and re-send an image the server no longer has; then retry (at most ``max_retries`` times)."""
        params = dict(params or {})
        if method in JOB_METHODS and "job_id" not in params:
            params["job_id"] = uuid.uuid4().hex
        for attempt in range(self.max_retries + 1):
            last_attempt = attempt == self.max_retries
            generation = self._generation
            try:
                if not self.connected:
                    if not self.auto_reconnect:
                        raise ServerConnectionError("not connected to the backend", "call connect() first")
                    self._reconnect(generation)
                    generation = self._generation
                return self._request(method, params, timeout, on_progress)
            except ServerConnectionError:
                if last_attempt or not self.auto_reconnect or self._closed.is_set():
                    raise
                self._reconnect(generation)
            except ServerError as exc:
                if last_attempt:
                    raise
                if exc.code == ErrorCode.UNKNOWN_SESSION:
                    with self._reconnect_lock:
                        self._handshake()
                elif exc.code == ErrorCode.UNKNOWN_IMAGE and self._resend_upload(params):
                    continue
                else:
                    raise
        raise AssertionError("unreachable")

    def _resend_upload(self, params: dict) -> bool:
        """Re-send the image/volume a call refers to, if this client uploaded it."""
        ids = [params.get("image_id"), params.get("volume_id"), *(params.get("image_ids") or [])]
        resent = False
        for upload_id in ids:
            if upload_id in self._uploads:
                method, upload_params = self._uploads[upload_id]
                log.info("re-sending %s %s to the server", method, upload_id)
                self._request(method, upload_params)
                resent = True
        return resent

    def run_in_background(self, method: Callable, *args, callback: Optional[Callable[[Any, Optional[BaseException]], None]] = None,
                          **kwargs) -> BackgroundCall:
        """Run a blocking client method (e.g. ``client.chat``) on a worker thread.

        ``callback(result, error)`` runs on that worker thread when it finishes. The returned handle can
        ``cancel()``; a ``job_id`` is created and passed to the method so the server can cancel it.
        """
        job_id = kwargs.setdefault("job_id", uuid.uuid4().hex)
        future = self._executor.submit(method, *args, **kwargs)
        if callback is not None:
            def _finished(done: Future) -> None:
                if done.cancelled():
                    error: Optional[BaseException] = CallCancelledError(ErrorCode.CANCELLED, "cancelled before it started")
                    result = None
                else:
                    error = done.exception()
                    result = None if error else done.result()
                try:
                    callback(result, error)
                except Exception:
                    log.exception("background callback failed")
            future.add_done_callback(_finished)
        return BackgroundCall(self, future, job_id)

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self.heartbeat_interval):
            if time.monotonic() - self._last_activity < self.heartbeat_interval:
                continue
            generation = self._generation
            try:
                self._request("ping", {}, timeout=self.ping_timeout)
            except (ServerConnectionError, CallTimeoutError) as exc:
                if self._closed.is_set():
                    return
                self._set_state("lost", str(exc))
                if self.auto_reconnect:
                    try:
                        self._reconnect(generation)
                    except CTReasonerError as reconnect_error:
                        log.warning("reconnect failed: %s", reconnect_error)
            except CTReasonerError as exc:
                log.warning("heartbeat: %s", exc)

    # ----------------------------------------------------------------- methods
    def ping(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Heartbeat. Returns {"model_state": "loading"|"ready"|"failed", "time": ..., ...}."""
        return self.call("ping", {}, timeout=self.ping_timeout if timeout is None else timeout)

    def cancel(self, job_id: str) -> bool:
        """Ask the server to cancel a running or queued job. True when the job was found."""
        return bool(self.call("cancel", {"job_id": job_id}, timeout=self.ping_timeout).get("cancelled"))

    def shutdown(self) -> None:
        """Stdio: the server process exits. HTTP: the server ends this client's session."""
        self._request("shutdown", {}, timeout=self.ping_timeout)

    def set_image(self, hu_slice: np.ndarray, ijk_to_ras: Optional[np.ndarray] = None, k: int = 0,
                  window: Optional[Tuple[float, float]] = None, job_id: Optional[str] = None,
                  timeout: Optional[float] = None, neighbours: Optional[np.ndarray] = None) -> str:
        """Upload one (H, W) slice in HU (int16, or float32). Returns its image id (a content hash).

        neighbours: (2, H, W) HU of the slices ``neighbour_distance_mm`` below and above it (the volume's
        ``k - offset`` and ``k + offset``, clamped to the volume: ``geometry.neighbour_slices``), for a model
        that reads them; leave None when ``neighbour_distance_mm`` is None.
        """
        pixels = _as_wire_pixels(hu_slice, ndim=2, name="hu_slice")
        geometry = SliceGeometry(np.eye(4) if ijk_to_ras is None else ijk_to_ras, k, pixels.shape)
        params: Dict[str, Any] = {"image": encode_array(pixels), "geometry": geometry.to_wire()}
        if neighbours is not None:
            params["neighbours"] = encode_array(_wire_neighbours(neighbours, pixels.shape))
        image_id = self._upload("set_image", "image_id", params, window, job_id, timeout)
        self._geometries[image_id] = geometry
        return image_id

    def set_volume(self, hu_volume: np.ndarray, ijk_to_ras: Optional[np.ndarray] = None,
                   window: Optional[Tuple[float, float]] = None, job_id: Optional[str] = None,
                   timeout: Optional[float] = None) -> str:
        """Upload a (K, H, W) stack of slices once, for ``propagate``. Returns its volume id."""
        pixels = _as_wire_pixels(hu_volume, ndim=3, name="hu_volume")
        matrix = np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras, dtype=np.float64)
        params: Dict[str, Any] = {"volume": encode_array(pixels), "geometry": {"ijk_to_ras": matrix.tolist()}}
        volume_id = self._upload("set_volume", "volume_id", params, window, job_id, timeout)
        self._geometries[volume_id] = SliceGeometry(matrix, 0, pixels.shape[1:])
        return volume_id

    def _upload(self, method: str, id_key: str, params: Dict[str, Any], window, job_id, timeout) -> str:
        """Send an image or volume upload and remember it (without its job id) for re-sending after a reconnect."""
        if window is not None:
            params["window"] = {"center": float(window[0]), "width": float(window[1])}
        upload_id = self.call(method, dict(params, job_id=job_id) if job_id else params, timeout=timeout)[id_key]
        self._remember_upload(upload_id, method, params)
        return upload_id

    def _remember_upload(self, upload_id: str, method: str, params: dict) -> None:
        self._uploads[upload_id] = (method, params)
        self._uploads.move_to_end(upload_id)
        while len(self._uploads) > self.UPLOADS_KEPT:
            dropped, _ = self._uploads.popitem(last=False)
            self._geometries.pop(dropped, None)

    def geometry(self, image_id: str) -> SliceGeometry:
        try:
            return self._geometries[image_id]
        except KeyError:
            raise CTReasonerError(f"image id {image_id} was not uploaded by this client",
                                  "call set_image first") from None

    def chat(self, image_id: str, message: str, history: Sequence[Sequence[str]] = (),
             closer_look: Optional[bool] = None, score_threshold: Optional[float] = None,
             return_probabilities: bool = False, mask_encoding: str = "bitpack",
             job_id: Optional[str] = None, on_progress: Optional[ProgressHandler] = None,
             timeout: Optional[float] = None) -> SliceReply:
        """One chat turn on an uploaded slice. ``closer_look=None`` lets the model decide ([CLOSER])."""
        options: Dict[str, Any] = {"return_probabilities": bool(return_probabilities), "mask_encoding": mask_encoding}
        if closer_look is not None:
            options["closer_look"] = bool(closer_look)
        if score_threshold is not None:
            options["score_threshold"] = float(score_threshold)
        params = {"image_id": image_id, "message": message, "history": [list(turn) for turn in history],
                  "options": options}
        if job_id:
            params["job_id"] = job_id
        result = self.call("chat", params, timeout=timeout, on_progress=on_progress)
        geometry = self.geometry(image_id)
        return SliceReply(image_id, geometry, decode_chat_result(result, geometry.shape))

    def refine(self, image_id: str, points: Sequence[Sequence[float]] = (), labels: Sequence[int] = (),
               box: Optional[Sequence[float]] = None, use_previous_mask: bool = False,
               organ: Optional[str] = None, return_probabilities: bool = False,
               job_id: Optional[str] = None, timeout: Optional[float] = None) -> RefineReply:
        """Refine a mask with clicks (label 1 = include, 0 = exclude), a box and/or the previous mask."""
        params: Dict[str, Any] = {"image_id": image_id, "points": [[float(x), float(y)] for x, y in points],
                                  "labels": [int(v) for v in labels], "use_previous_mask": bool(use_previous_mask),
                                  "return_probabilities": bool(return_probabilities)}
        if box is not None:
            params["box"] = [float(v) for v in box]
        if organ is not None:
            params["organ"] = organ
        if job_id:
            params["job_id"] = job_id
        result = self.call("refine", params, timeout=timeout)
        geometry = self.geometry(image_id)
        return RefineReply(image_id, geometry, decode_mask_entry(result["mask"], geometry.shape),
                           dict(result.get("timings_ms", {})))

    def closer_look(self, image_id: str, roi_xyxy: Optional[Sequence[float]] = None, organ: Optional[str] = None,
                    query: Optional[str] = None, job_id: Optional[str] = None,
                    timeout: Optional[float] = None) -> SliceReply:
        """Re-segment inside an ROI (given, or the box of the last mask of ``organ``) at the canonical size."""
        params: Dict[str, Any] = {}
        if roi_xyxy is not None:
            params["roi_xyxy"] = [float(v) for v in roi_xyxy]
        if organ is not None:
            params["organ"] = organ
        if query is not None:
            params["query"] = query
        if job_id:
            params["job_id"] = job_id
        params["image_id"] = image_id
        result = self.call("closer_look", params, timeout=timeout)
        geometry = self.geometry(image_id)
        return SliceReply(image_id, geometry, decode_chat_result(result, geometry.shape))

    def propagate(self, volume_id: str, seed_k: int, organ: Optional[str] = None,
                  seed_mask: Optional[np.ndarray] = None, query: Optional[str] = None, direction: str = "both",
                  slice_range: Optional[Tuple[int, int]] = None, strategy: str = "requery",
                  on_progress: Optional[ProgressHandler] = None, job_id: Optional[str] = None,
                  timeout: Optional[float] = None) -> PropagationReply:
        """Propagate a seed mask (or the ``query``'s answer on ``seed_k``) through the uploaded volume."""
        params: Dict[str, Any] = {"volume_id": volume_id, "seed_k": int(seed_k), "direction": direction,
                                  "strategy": strategy}
        if organ is not None:
            params["organ"] = organ
        if seed_mask is not None:
            params["seed_mask"] = encode_mask(seed_mask)
        if query is not None:
            params["query"] = query
        if slice_range is not None:
            params["slice_range"] = [int(slice_range[0]), int(slice_range[1])]
        if job_id:
            params["job_id"] = job_id
        result = self.call("propagate", params, timeout=timeout, on_progress=on_progress)
        geometry = self.geometry(volume_id)
        masks = {int(entry["k"]): decode_mask(entry["mask"], shape=geometry.shape) for entry in result["slices"]}
        scores = {int(entry["k"]): float(entry.get("score", 1.0)) for entry in result["slices"]}
        return PropagationReply(volume_id, result.get("organ"), masks, scores, geometry.ijk_to_ras,
                                str(result.get("stopped", "")), dict(result.get("timings_ms", {})))


def _as_wire_pixels(array: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """HU pixels in a dtype the wire accepts: int16 as is, floats as float32, other integers as int16."""
    array = np.asarray(array)
    if array.ndim != ndim:
        raise PayloadError(f"{name} must be {ndim}-D, got shape {list(array.shape)}",
                           "send one axial slice (H, W)" if ndim == 2 else "send a (K, H, W) stack")
    if array.dtype == np.int16 or array.dtype == np.float32:
        return array
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iub":
        if array.size and (array.min() < -32768 or array.max() > 32767):
            raise PayloadError(f"{name} values {array.min()}..{array.max()} do not fit in int16 HU")
        return array.astype(np.int16)
    raise PayloadError(f"{name} has dtype {array.dtype}; send int16 HU or float32")


def _wire_neighbours(neighbours: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """(2, H, W) HU of the slices either side of an (H, W) slice, in a dtype the wire accepts."""
    neighbours = np.asarray(neighbours)
    if neighbours.shape != (2,) + tuple(shape):
        raise PayloadError(f"neighbours must have shape {[2, *shape]} (the slice below, then the one above), "
                           f"got {list(neighbours.shape)}", "take them with geometry.neighbour_slices, uncropped")
    return _as_wire_pixels(neighbours, ndim=3, name="neighbours")


def decode_mask_entry(entry: dict, shape: Tuple[int, int]) -> MaskPrediction:
    probability = entry.get("probability")
    return MaskPrediction(organ=str(entry.get("organ", "")), mask=decode_mask(entry["mask"], shape=shape),
                          score=float(entry.get("score", 1.0)),
                          probability=None if probability is None else decode_probability(probability),
                          round=int(entry.get("round", 1)))


def decode_chat_result(result: dict, shape: Tuple[int, int]) -> ChatResult:
    """The wire form of a chat/closer-look result -> ``ChatResult`` with numpy masks and boxes."""
    closer = result.get("closer_look") or {}
    roi = closer.get("roi_xyxy")
    return ChatResult(
        text=str(result.get("text", "")),
        raw_text=str(result.get("raw_text", "")),
        turns=[(str(question), str(answer)) for question, answer in result.get("turns", [])],
        routing_tokens=list(result.get("routing_tokens", [])),
        target_organ=result.get("target_organ"),
        absent=bool(result.get("absent", False)),
        masks=[decode_mask_entry(entry, shape) for entry in result.get("masks", [])],
        boxes=[BoxPrediction(organ=str(b.get("organ", "")), xyxy=np.asarray(b["xyxy"], dtype=np.float64),
                             score=float(b.get("score", 1.0)), source=str(b.get("source", "detection")))
               for b in result.get("boxes", [])],
        closer_look=CloserLookInfo(ran=bool(closer.get("ran", False)),
                                   roi_xyxy=None if roi is None else np.asarray(roi, dtype=np.float64),
                                   canonical_size=int(closer.get("canonical_size", 0)),
                                   organ=closer.get("organ"), kept_round=int(closer.get("kept_round", 2))),
        timings_ms={str(k): float(v) for k, v in (result.get("timings_ms") or {}).items()},
        presence=None if result.get("presence") is None else float(result["presence"]),
        presence_overruled=bool(result.get("presence_overruled", False)),
        presence_rescued=bool(result.get("presence_rescued", False)),
    )
