"""How JSON-RPC messages reach the server: a subprocess over stdio (local or ``ssh``), or HTTP.

Standard library only. A transport delivers every incoming message (responses and notifications) to
``on_message`` from its own thread, and calls ``on_lost(reason)`` once when the server goes away.
"""
from __future__ import annotations

import collections
import http.client
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.parse
from typing import Callable, Deque, Dict, List, Optional, Sequence

from .spec import NDJSON_CONTENT_TYPE, SESSION_HEADER

log = logging.getLogger(__name__)


def _json_lines(stream, source: str):
    """JSON values of a newline-delimited byte stream, until EOF.

    Blank lines are skipped, and so are lines that are not JSON: something other than the protocol
    (a stray print on the remote side) must never break the channel.
    """
    for line in iter(stream.readline, b""):
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except ValueError:
            log.warning("ignoring a non-JSON line from %s: %r", source, line[:200])

MessageHandler = Callable[[dict], None]
LostHandler = Callable[[str], None]


class TransportError(ConnectionError):
    """The message could not be delivered (the server is gone or unreachable)."""


class RequestTooLargeError(ValueError):
    """A request larger than the server accepts (checked before sending it)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the request is {size / 2**20:.1f} MiB, the server accepts at most {limit / 2**20:.1f} MiB")
        self.size, self.limit = size, limit


class Transport:
    """Base class: ``start`` once, ``send`` messages, ``close`` when done.

    max_request_bytes: the server's limit (from ``initialize``); larger requests are refused before sending.
    """

    max_request_bytes: Optional[int] = None

    def _serialize(self, message: dict, newline: bool) -> bytes:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8") + (b"\n" if newline else b"")
        if self.max_request_bytes and len(data) > self.max_request_bytes:
            raise RequestTooLargeError(len(data), self.max_request_bytes)
        return data

    def start(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        raise NotImplementedError

    def send(self, message: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class StdioTransport(Transport):
    """Newline-delimited JSON over the stdin/stdout of a child process.

    ``command`` is the full command line, e.g. ``[python, "-m", "CTReasonerLib.cli", "serve", "--stdio"]`` or
    ``["ssh", "-T", "gpu-host", "ctreasoner", "serve", "--stdio"]``. The child runs in its own process group
    (its own session on POSIX) so that ``close`` can end the whole tree it started.
    """

    STDERR_LINES_KEPT = 50

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 on_stderr: Optional[Callable[[str], None]] = None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.on_stderr = on_stderr
        self.stderr_tail: Deque[str] = collections.deque(maxlen=self.STDERR_LINES_KEPT)
        self._process: Optional[subprocess.Popen] = None
        self._write_lock = threading.Lock()
        self._lost_reported = threading.Event()

    def start(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        popen_kwargs = {}
        if os.name == "posix":
            popen_kwargs["start_new_session"] = True
        else:
            popen_kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        try:
            self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, **popen_kwargs)
        except OSError as exc:
            raise TransportError(f"could not start the backend ({' '.join(self.command)}): {exc}") from None
        threading.Thread(target=self._read_stdout, args=(on_message, on_lost), daemon=True,
                         name="ctreasoner-stdio-reader").start()
        threading.Thread(target=self._read_stderr, daemon=True, name="ctreasoner-stdio-stderr").start()

    def _read_stdout(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        for message in _json_lines(self._process.stdout, "the backend"):
            if isinstance(message, dict):
                on_message(message)
            elif isinstance(message, list):
                for item in message:
                    if isinstance(item, dict):
                        on_message(item)
        code = self._process.wait()
        self._report_lost(on_lost, f"the backend process exited with code {code}")

    def _read_stderr(self) -> None:
        for raw in iter(self._process.stderr.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(text)
            if self.on_stderr is not None:
                self.on_stderr(text)

    def _report_lost(self, on_lost: LostHandler, reason: str) -> None:
        if not self._lost_reported.is_set():
            self._lost_reported.set()
            tail = "\n".join(list(self.stderr_tail)[-10:])
            on_lost(f"{reason}; last backend log lines:\n{tail}" if tail else reason)

    def send(self, message: dict) -> None:
        if not self.alive:
            raise TransportError("the backend process is not running")
        data = self._serialize(message, newline=True)
        try:
            with self._write_lock:
                self._process.stdin.write(data)
                self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise TransportError(f"the backend process closed its input ({exc})") from None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def close(self, grace_s: float = 3.0) -> None:
        """Close stdin (the server exits on EOF), then end the process group if it lingers."""
        process = self._process
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        kill_process_tree(process, grace_s)
        for stream in (process.stdout, process.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def describe(self) -> str:
        return "stdio: " + " ".join(self.command)


def kill_process_tree(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Terminate ``process`` and everything in its process group (it must have been started in its own)."""
    if os.name != "posix":
        if process.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
        process.wait(timeout=grace_s)
        return
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        group = process.pid  # the leader exited; its group id is still its pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace_s)
            # The leader is gone; make sure no child it left behind survives.
            os.killpg(group, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        break
    process.poll()


class HttpTransport(Transport):
    """JSON-RPC over HTTP POST ``<url>/rpc`` with a bearer token.

    Each request runs on a pooled keep-alive connection in a worker thread; the server streams progress
    notifications followed by the response as newline-delimited JSON, delivered as they arrive.
    """

    def __init__(self, url: str, token: Optional[str] = None, connect_timeout: float = 10.0,
                 request_timeout: float = 3600.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise TransportError(f"server URL {url!r} must look like http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self._parsed = parsed
        self.token = token
        self.session_id: Optional[str] = None
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._idle: "queue.LifoQueue[http.client.HTTPConnection]" = queue.LifoQueue()
        self._on_message: Optional[MessageHandler] = None
        self._on_lost: Optional[LostHandler] = None
        self._closed = False

    def start(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        self._on_message, self._on_lost = on_message, on_lost

    def _connection(self) -> http.client.HTTPConnection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
            return cls(self._parsed.hostname, self._parsed.port, timeout=self.request_timeout)

    def send(self, message: dict) -> None:
        if self._closed:
            raise TransportError("the HTTP transport is closed")
        body = self._serialize(message, newline=False)
        headers = {"Content-Type": "application/json", "Accept": NDJSON_CONTENT_TYPE}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.session_id:
            headers[SESSION_HEADER] = self.session_id
        threading.Thread(target=self._post, args=(body, headers, message.get("id")), daemon=True,
                         name="ctreasoner-http-request").start()

    def _post(self, body: bytes, headers: Dict[str, str], request_id) -> None:
        path = (self._parsed.path or "") + "/rpc"
        for attempt in range(2):  # a pooled keep-alive connection may have been closed by the server
            connection = self._connection()
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                self._read_response(response, request_id)
                self._idle.put(connection)
                return
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                connection.close()
                fresh_connection_failed = attempt == 1 or isinstance(exc, ConnectionRefusedError)
                if fresh_connection_failed:
                    if self._on_lost is not None:
                        self._on_lost(f"cannot reach the server at {self.url}: {exc}")
                    return

    def _read_response(self, response: http.client.HTTPResponse, request_id) -> None:
        received_any = False
        for message in _json_lines(response, "the server"):
            if isinstance(message, dict):
                received_any = True
                if "error" in message and message.get("id") is None and request_id is not None:
                    # refused before the body was read (401, 413): one response per POST, so it is ours
                    message["id"] = request_id
                self._on_message(message)
        if not received_any and request_id is not None:
            self._on_message({"jsonrpc": "2.0", "id": request_id, "error": {
                "code": -32603, "message": f"HTTP {response.status} {response.reason} without a JSON-RPC body"}})

    @property
    def alive(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break

    def describe(self) -> str:
        return f"http: {self.url}"


def local_server_command(python: Optional[str] = None, model: Optional[str] = None, device: str = "auto",
                         extra_args: Sequence[str] = ()) -> List[str]:
    """Command line that runs the backend over stdio with a given Python interpreter."""
    command = [python or sys.executable, "-m", "CTReasonerLib.cli", "serve", "--stdio", "--device", device]
    if model:
        command += ["--model", str(model)]
    return command + [str(a) for a in extra_args]


def ssh_server_command(host: str, remote_command: str = "ctreasoner serve --stdio", ssh: str = "ssh",
                       ssh_options: Sequence[str] = ()) -> List[str]:
    """Command line that runs the backend on ``host`` over ssh (no open port; ssh authenticates).

    ``-T`` (no pseudo-terminal) keeps the channel binary-clean; BatchMode fails fast instead of prompting
    for a password nobody can type from inside Slicer.
    """
    return [ssh, "-T", "-o", "BatchMode=yes", *ssh_options, host, remote_command]
