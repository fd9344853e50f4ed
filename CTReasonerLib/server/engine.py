"""``Engine``: the ONLY place the server calls the model.

It loads the model once (in a background thread, one log line per stage with its time, to stderr), keeps
the content-addressed image-embedding cache, and turns protocol-level calls into pipeline calls under
``torch.inference_mode``. A model failure (exception, out of memory) is raised to the one request that
caused it; the engine stays usable.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..client.spec import ErrorCode
from ..errors import CTReasonerError, ModelError
from ..results import ChatResult, MaskPrediction
from .protocol import RpcError

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                 "Resources", "Models", "CTReasoner-Tiny")


@dataclass
class PropagationOutcome:
    """Per-slice masks of a propagation: masks[k] = ((H, W) bool, score), k = index in the stack."""
    organ: Optional[str]
    masks: Dict[int, Tuple[np.ndarray, float]] = field(default_factory=dict)
    stopped: str = "range_end"


#: (stack index k) -> (2, H, W) HU of the slices either side of slice k for the model, or None (it reads none)
NeighboursOf = Callable[[int], Optional[np.ndarray]]


def pixel_digest(pixels: np.ndarray, neighbours: Optional[np.ndarray] = None):
    """SHA-1 of HU pixels as float32 (equal values sent as int16 or float32 digest alike), and of the (2, H, W)
    slices either side when given: the same slice with other neighbours is another input to the model."""
    digest = hashlib.sha1(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    if neighbours is not None:
        digest.update(b"neighbours")
        digest.update(np.ascontiguousarray(neighbours, dtype=np.float32).tobytes())
    return digest


def propagation_order(seed: int, first: int, last: int, direction: str) -> List[List[int]]:
    """Slice indices to visit from ``seed`` (exclusive) within [first, last], one list per direction.

    "up" walks increasing k, "down" decreasing k, "both" both (up first).
    """
    up = list(range(seed + 1, last + 1))
    down = list(range(seed - 1, first - 1, -1))
    return {"up": [up], "down": [down], "both": [up, down]}[direction]


class Engine:
    """Loads and runs the CTReasoner model for the server.

    model: a model folder, ``"tiny-random"`` (random-init tiny model, for tests), or None (bundled default).
    state: "loading" -> "ready" | "failed" (with ``error``); ``stage`` names the current loading stage.
    """

    RESULTS_KEPT = 32

    def __init__(self, model: Optional[str] = None, device: str = "auto", dtype: Optional[str] = None,
                 cache_bytes: int = 512 * 2**20, seed: int = 0):
        self.model_spec = model or DEFAULT_MODEL_DIR
        self.device_preference = device
        self.dtype_preference = dtype
        self.cache_bytes = cache_bytes
        self.seed = seed
        self.state = "loading"
        self.stage = "not started"
        self.error: Optional[str] = None
        self.load_seconds: Optional[float] = None
        self.pipeline = None
        self.cache = None
        self._results: "OrderedDict[str, ChatResult]" = OrderedDict()
        self._results_lock = threading.Lock()
        self._description: Dict[str, object] = {"model_id": self._model_id()}

    # ----------------------------------------------------------------- loading
    def _model_id(self) -> str:
        if self.model_spec == TINY_RANDOM:
            return f"{TINY_RANDOM}(seed={self.seed})"
        return os.path.basename(os.path.normpath(self.model_spec))

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, daemon=True, name="ctreasoner-model-load")
        thread.start()
        return thread

    @contextlib.contextmanager
    def _stage(self, name: str):
        self.stage = name
        started = time.perf_counter()
        yield
        log.info("model load: %-28s %7.2f s", name, time.perf_counter() - started)

    def load(self) -> None:
        """Load the model; never raises (the failure is kept in ``state``/``error`` and shown to clients)."""
        started = time.perf_counter()
        try:
            if self.model_spec != TINY_RANDOM and not os.path.isdir(self.model_spec):
                raise ModelError(f"model folder {self.model_spec} does not exist",
                                 "pass --model DIR (a trained CTReasoner folder) or --model tiny-random")
            with self._stage("import torch and model code"):
                from ..model.device import select_device, select_dtype
                from ..model.ctreasoner import CTReasonerModel
                from ..model.inference import CTReasonerPipeline
                from ..model.segmenter import EmbeddingCache
            with self._stage("select device"):
                device = select_device(self.device_preference)
                dtype = select_dtype(device, self.dtype_preference)
            if self.model_spec == TINY_RANDOM:
                with self._stage("build random tiny model"):
                    model = CTReasonerModel.build_tiny(seed=self.seed)
                with self._stage(f"move to {device} ({str(dtype).replace('torch.', '')})"):
                    model = model.to(device=device, dtype=dtype)
            else:
                with self._stage(f"load weights to {device} ({str(dtype).replace('torch.', '')})"):
                    model = CTReasonerModel.from_pretrained(self.model_spec, device=device, dtype=dtype)
            model.eval()
            with self._stage("build pipeline"):
                self.cache = EmbeddingCache(self.cache_bytes)
                self.pipeline = CTReasonerPipeline(model, embedding_cache=self.cache)
            self._description = self._describe_model(model, device, dtype)
            self.load_seconds = time.perf_counter() - started
            self.state = "ready"
            log.info("model ready in %.2f s: %s", self.load_seconds, self._description)
        except BaseException as exc:  # noqa: BLE001 - reported through ping/initialize, the server stays up
            self.error = exc.message if isinstance(exc, CTReasonerError) else f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.error("model load failed during '%s': %s", self.stage, self.error)

    def _describe_model(self, model, device, dtype) -> Dict[str, object]:
        config = getattr(model, "config", None)
        lvlm = getattr(config, "lvlm", None)
        segmenter = getattr(config, "segmenter", None)
        return {
            "model_id": self._model_id(),
            "backbone": getattr(lvlm, "backbone", None) if lvlm is not None else None,
            "backbone_path": getattr(lvlm, "path", None) if lvlm is not None else None,
            "segmenter": (f"{segmenter.type}:{segmenter.variant}" if segmenter is not None else None),
            "segmenter_image_size": getattr(segmenter, "image_size", None),
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
        }

    def describe(self) -> Dict[str, object]:
        """{model_id, backbone, segmenter, device, dtype, neighbour_distance_mm, ...}; only model_id until loaded."""
        description = dict(self._description, state=self.state)
        if self.load_seconds is not None:
            description["load_seconds"] = round(self.load_seconds, 3)
        if self.state == "ready":
            description["neighbour_distance_mm"] = self.neighbour_distance_mm
        return description

    @property
    def neighbour_distance_mm(self) -> Optional[float]:
        """How far either side of a slice the model reads its neighbours, in mm; None when it reads none (or
        is not loaded): clients then send no neighbours."""
        distance = getattr(self.pipeline, "neighbour_distance_mm", None)
        return None if distance is None else float(distance)

    def require_ready(self) -> None:
        if self.state == "loading":
            raise RpcError(ErrorCode.MODEL_NOT_LOADED, f"the model is still loading (stage: {self.stage})",
                           "wait until ping reports model_state 'ready'")
        if self.state != "ready":
            raise RpcError(ErrorCode.MODEL_NOT_LOADED, f"the model could not be loaded: {self.error}",
                           "fix the model path/device and restart the server ('ctreasoner serve --check')")

    def propagate_strategies(self) -> List[str]:
        strategies = ["requery"]
        if self.pipeline is not None and getattr(self.pipeline, "supports_video_propagation", False):
            strategies.append("sam2")
        return strategies

    # ----------------------------------------------------------------- model calls
    @contextlib.contextmanager
    def _model_call(self, what: str):
        """inference_mode + turning out-of-memory into a clear per-request error (and freeing the cache)."""
        import torch
        try:
            with torch.inference_mode():
                yield
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise RpcError(ErrorCode.MODEL_FAILURE, f"{what}: the GPU ran out of memory ({exc})".split("\n")[0],
                           "send a smaller slice or ROI, or free GPU memory; the server is still running") from None

    def prepare_image(self, pixels: np.ndarray) -> str:
        """Encode the slice into the embedding cache. Returns "cached" (already there) or "computed"."""
        with self._model_call("encoding the image"):
            return "cached" if self.pipeline.encode_image(pixels) else "computed"

    def chat(self, pixels: np.ndarray, message: str, history: Sequence[Tuple[str, str]],
             closer_look: Optional[bool] = None, score_threshold: Optional[float] = None,
             return_probabilities: bool = False, job=None, neighbours: Optional[np.ndarray] = None) -> ChatResult:
        """One chat turn on (H, W) HU ``pixels`` with the (2, H, W) ``neighbours`` either side, if sent.
        Generation is greedy, hence deterministic: the same turn on the same pixels and neighbours is answered
        from a small result cache (``timings_ms`` then says ``result_cache``)."""
        if job is not None:
            job.check_cancelled()
        started = time.perf_counter()
        digest = pixel_digest(pixels, neighbours)
        digest.update(repr((pixels.shape, message, list(map(tuple, history)), closer_look, score_threshold,
                            return_probabilities)).encode())
        key = digest.hexdigest()
        with self._results_lock:
            cached = self._results.get(key)
            if cached is not None:
                self._results.move_to_end(key)
        if cached is not None:
            return replace(cached, timings_ms={"result_cache": (time.perf_counter() - started) * 1000.0})
        with self._model_call("chat"):
            result = self.pipeline.chat(pixels, message, list(history), closer_look=closer_look,
                                        score_threshold=score_threshold, return_probabilities=return_probabilities,
                                        neighbours_hu=neighbours)
        with self._results_lock:
            self._results[key] = result
            while len(self._results) > self.RESULTS_KEPT:
                self._results.popitem(last=False)
        return result

    def refine(self, pixels: np.ndarray, points_xy: np.ndarray, labels: np.ndarray, box: Optional[np.ndarray],
               mask_logits: Optional[np.ndarray], organ: str, job=None) -> MaskPrediction:
        if job is not None:
            job.check_cancelled()
        with self._model_call("refine"):
            return self.pipeline.refine(pixels, points=points_xy if len(points_xy) else None,
                                        labels=labels if len(labels) else None, box=box,
                                        mask_logits=mask_logits, organ=organ)

    def closer_look(self, pixels: np.ndarray, roi_xyxy: Optional[np.ndarray], previous_mask: Optional[np.ndarray],
                    organ: Optional[str], query: Optional[str], job=None,
                    neighbours: Optional[np.ndarray] = None) -> ChatResult:
        if job is not None:
            job.check_cancelled()
        with self._model_call("closer look"):
            return self.pipeline.closer_look(pixels, roi_xyxy=roi_xyxy, mask=previous_mask, organ=organ, query=query,
                                             neighbours_hu=neighbours)

    def propagate(self, stack: np.ndarray, seed: int, slice_range: Tuple[int, int], direction: str, strategy: str,
                  organ: Optional[str] = None, query: Optional[str] = None, seed_mask: Optional[np.ndarray] = None,
                  job=None, neighbours_of: Optional[NeighboursOf] = None) -> PropagationOutcome:
        """Requery strategy: ask the query again on each slice outward from ``seed``; a direction stops at the
        first slice where the organ is absent (empty mask) or at the end of ``slice_range``.
        ``neighbours_of(k)``: the slices either side of stack slice ``k`` for the model (None: none sent)."""
        from ..organs import get_organ
        if strategy != "requery":
            raise RpcError(ErrorCode.INVALID_PARAMS, f"strategy {strategy!r} is not available on this server")
        query = query or f"segment the {get_organ(organ).name}"
        order = propagation_order(seed, slice_range[0], slice_range[1], direction)
        total = 1 + sum(len(ks) for ks in order)
        outcome = PropagationOutcome(organ=organ)

        def segment(k: int) -> Optional[Tuple[np.ndarray, float]]:
            neighbours = None if neighbours_of is None else neighbours_of(k)
            result = self.chat(stack[k], query, [], closer_look=False, job=job, neighbours=neighbours)
            if outcome.organ is None:
                outcome.organ = result.target_organ
            wanted = [m for m in result.masks if outcome.organ is None or m.organ == outcome.organ]
            if result.absent or not wanted or not wanted[0].mask.any():
                return None
            return wanted[0].mask, float(wanted[0].score)

        done = 0
        seed_result = (seed_mask.astype(bool), 1.0) if seed_mask is not None else segment(seed)
        done += 1
        if job is not None:
            job.progress(done, total, f"slice {seed} (seed)")
        if seed_result is None:
            outcome.stopped = "absent_on_seed"
            return outcome
        outcome.masks[seed] = seed_result
        stops = []
        for ks in order:
            stop = "range_end"
            for k in ks:
                found = segment(k)
                done += 1
                if job is not None:
                    job.progress(done, total, f"slice {k}")
                if found is None:
                    stop = "organ_absent"
                    break
                outcome.masks[k] = found
            stops.append(stop)
        outcome.stopped = ",".join(stops)
        if job is not None:
            job.progress(total, total, "done")
        return outcome


def check_environment(model: Optional[str], device: str, dtype: Optional[str]) -> Tuple[bool, str]:
    """``ctreasoner serve --check``: dependencies, device, and a real model load + one tiny chat turn."""
    import importlib
    lines, ok = [], True
    for module in ("numpy", "torch", "torchvision", "transformers", "segment_anything", "starlette", "uvicorn"):
        try:
            imported = importlib.import_module(module)
            lines.append(f"  ok    {module} {getattr(imported, '__version__', '')}")
        except Exception as exc:  # report every missing dependency, not just the first
            ok = False
            lines.append(f"  FAIL  {module}: {exc}")
    try:
        from ..model.device import select_device
        selected = select_device(device)
        lines.append(f"  ok    device {selected}")
    except Exception as exc:
        ok = False
        lines.append(f"  FAIL  device {device}: {exc}")
    if ok:
        engine = Engine(model, device=device, dtype=dtype)
        engine.load()
        if engine.state == "ready":
            lines.append(f"  ok    model {engine.describe()} loaded in {engine.load_seconds:.2f} s")
            try:
                started = time.perf_counter()
                engine.chat(np.full((64, 64), -1000, np.float32), "segment the liver", [])
                lines.append(f"  ok    one chat turn on a 64x64 slice in {time.perf_counter() - started:.2f} s")
            except Exception as exc:
                ok = False
                lines.append(f"  FAIL  chat turn: {exc}")
        else:
            ok = False
            lines.append(f"  FAIL  model {engine.model_spec}: {engine.error}")
    header = "ctreasoner serve --check: " + ("all checks passed" if ok else "PROBLEMS FOUND")
    return ok, "\n".join([header] + lines)
