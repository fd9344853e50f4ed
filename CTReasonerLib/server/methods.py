"""The JSON-RPC methods: validate parameters, call the engine, encode results for the wire.

Every method, parameter and result here is documented in ``docs/protocol.md``. Unknown parameters are
ignored (a newer client with the same major version may send optional extras).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import __version__ as SERVER_VERSION
from ..client.encoding import MASK_ENCODINGS, decode_array, decode_mask, encode_mask, encode_probability
from ..client.geometry import SliceGeometry, ijk_spacing
from ..client.spec import PROTOCOL_VERSION, ErrorCode, parse_version, versions_compatible
from ..io.slices import neighbour_offset, neighbour_slices
from ..organs import get_organ
from ..results import ChatResult, MaskPrediction
from .engine import NeighboursOf, pixel_digest
from .protocol import MethodRegistry, RpcError, invalid_params
from .service import CallContext

registry = MethodRegistry()

DIRECTIONS = ("up", "down", "both")


# ---------------------------------------------------------------------------- parameter checks
def _param(params: Dict[str, Any], name: str, types, required: bool = False, default=None):
    value = params.get(name, None)
    if value is None:
        if required:
            raise invalid_params(f"missing parameter '{name}'")
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise invalid_params(f"'{name}' must be {_type_names(types)}, got a boolean")
    if not isinstance(value, types):
        raise invalid_params(f"'{name}' must be {_type_names(types)}, got {type(value).__name__}")
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _number(params: Dict[str, Any], name: str, default: Optional[float] = None, low: float = -math.inf,
            high: float = math.inf) -> Optional[float]:
    value = _param(params, name, (int, float), default=default)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid_params(f"'{name}' must be a finite number in [{low}, {high}], got {value}")
    return value


def _organ_key(name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    try:
        return get_organ(name).key
    except KeyError:
        raise invalid_params(f"unknown organ {name!r}", "use one of the 14 organ keys, e.g. 'liver'") from None


def _xyxy(value: Any, name: str, shape: Tuple[int, int]) -> np.ndarray:
    try:
        box = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid_params(f"'{name}' must be [x0, y0, x1, y1] numbers") from None
    height, width = shape
    if box.shape != (4,) or not np.isfinite(box).all():
        raise invalid_params(f"'{name}' must be 4 finite numbers [x0, y0, x1, y1], got {value!r}")
    if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        raise invalid_params(f"'{name}' {box.tolist()} is not a non-empty box inside the {width}x{height} image")
    return box


def _window(params: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    window = _param(params, "window", dict)
    if window is None:
        return None
    center, width = window.get("center"), window.get("width")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (center, width)) \
            or width <= 0:
        raise invalid_params(f"'window' must be {{center, width > 0}} finite numbers, got {window!r}")
    return float(center), float(width)


def _content_id(pixels: np.ndarray, geometry: SliceGeometry, neighbours: Optional[np.ndarray] = None) -> str:
    """SHA-1 of the HU pixels, their neighbours (if sent), their shape and where they sit (equal air slices at
    two k are two images; they still share one cached embedding, which the engine keys by pixels alone)."""
    digest = pixel_digest(pixels, neighbours)
    digest.update(repr((pixels.shape, geometry.k, np.round(geometry.ijk_to_ras, 6).tolist())).encode())
    return digest.hexdigest()


def _finite_or_none(value: Any) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------- result encoding
def encode_mask_entry(prediction: MaskPrediction, mask_encoding: str, with_probability: bool) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"organ": prediction.organ, "score": _finite_or_none(prediction.score),
                             "round": int(prediction.round), "mask": encode_mask(prediction.mask, mask_encoding)}
    if with_probability and prediction.probability is not None:
        entry["probability"] = encode_probability(prediction.probability)
    return entry


def encode_chat_result(result: ChatResult, mask_encoding: str, with_probability: bool) -> Dict[str, Any]:
    closer = result.closer_look
    return {
        "text": result.text,
        "raw_text": result.raw_text,
        "turns": [[str(question), str(answer)] for question, answer in result.turns],
        "presence": None if result.presence is None else _finite_or_none(result.presence),
        "presence_overruled": bool(result.presence_overruled),
        "presence_rescued": bool(result.presence_rescued),
        "routing_tokens": list(result.routing_tokens),
        "target_organ": result.target_organ,
        "absent": bool(result.absent),
        "masks": [encode_mask_entry(m, mask_encoding, with_probability) for m in result.masks],
        "boxes": [{"organ": b.organ, "xyxy": [float(v) for v in np.asarray(b.xyxy).reshape(4)],
                   "score": _finite_or_none(b.score), "source": b.source} for b in result.boxes],
        "closer_look": {"ran": bool(closer.ran),
                        "roi_xyxy": None if closer.roi_xyxy is None else [float(v) for v in np.asarray(closer.roi_xyxy)],
                        "canonical_size": int(closer.canonical_size), "organ": closer.organ,
                        "kept_round": int(closer.kept_round)},
        "timings_ms": {k: round(float(v), 3) for k, v in result.timings_ms.items()},
    }


def _remember_masks(context: CallContext, image_id: str, masks: Sequence[MaskPrediction]) -> None:
    """Keep each organ's latest logits and mask (keyed by organ key) for refine/closer_look."""
    for prediction in masks:
        try:
            organ = get_organ(prediction.organ).key
        except KeyError:
            organ = prediction.organ
        context.session.remember_prediction(image_id, organ, prediction.logits_lowres, prediction.mask)


def _mask_options(options: Dict[str, Any]) -> Tuple[str, bool]:
    encoding = _param(options, "mask_encoding", str, default="bitpack")
    if encoding not in MASK_ENCODINGS:
        raise invalid_params(f"unknown mask_encoding {encoding!r}; use one of {', '.join(MASK_ENCODINGS)}")
    return encoding, bool(_param(options, "return_probabilities", bool, default=False))


# ---------------------------------------------------------------------------- methods
@registry.method("initialize", needs_session=False)
def initialize(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """Handshake: check the protocol version, open the session (HTTP), describe the server."""
    client_version = _param(params, "protocol_version", str, required=True)
    try:
        parse_version(client_version)
    except ValueError as exc:
        raise invalid_params(str(exc)) from None
    if not versions_compatible(client_version, PROTOCOL_VERSION):
        raise RpcError(ErrorCode.VERSION_MISMATCH,
                       f"protocol version mismatch: the client speaks {client_version}, "
                       f"the server speaks {PROTOCOL_VERSION}",
                       "install the same CTReasoner version on both sides")
    service = context.service
    client = _param(params, "client", dict, default={})
    session = context.session or service.sessions.create(service.transport,
                                                          {k: str(v) for k, v in client.items()})
    engine = service.engine
    return {
        "protocol_version": PROTOCOL_VERSION,
        "server_version": SERVER_VERSION,
        "session_id": session.session_id,
        "transport": service.transport,
        "model": engine.describe(),
        "model_state": engine.state,
        "capabilities": {
            "methods": registry.names,
            "image_dtypes": ["int16", "float32"],
            "mask_encodings": list(MASK_ENCODINGS),
            "propagate_strategies": engine.propagate_strategies(),
            "max_request_bytes": service.limits.max_request_bytes,
            "max_image_side": service.limits.max_image_side,
            "progress_notifications": True,
        },
    }


@registry.method("ping", needs_session=False)
def ping(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """Heartbeat; also reports model loading progress."""
    engine = context.engine
    status = {"time": time.time(), "model_state": engine.state, "model": engine.describe(),
              "active_jobs": context.service.jobs.active()}
    if engine.state == "failed":
        status["model_error"] = engine.error
    if engine.state == "loading":
        status["model_stage"] = engine.stage
    return status


@registry.method("cancel")
def cancel(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    job_id = _param(params, "job_id", str, required=True)
    return {"job_id": job_id, "cancelled": context.service.jobs.cancel(context.session.session_id, job_id)}


@registry.method("shutdown")
def shutdown(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """stdio: the process exits after answering. HTTP: closes the caller's session only."""
    service = context.service
    if service.transport == "stdio":
        service.shutdown_requested.set()
        return {"shutting_down": True}
    service.close_session(context.session)
    return {"session_closed": True}


def _decode_pixels(context: CallContext, payload: Any, name: str, ndim: int) -> np.ndarray:
    pixels = decode_array(payload, name=name, dtypes=("int16", "float32"), ndim=ndim)
    limit = context.service.limits.max_image_side
    height, width = pixels.shape[-2:]
    if not (8 <= height <= limit and 8 <= width <= limit):
        raise invalid_params(f"'{name}' slices are {height}x{width}; each side must be in [8, {limit}]",
                             "send one axial slice or an ROI crop")
    return pixels.astype(np.float32, copy=False)


def _neighbours(context: CallContext, params: Dict[str, Any], shape: Tuple[int, int]) -> Optional[np.ndarray]:
    """The optional (2, H, W) float32 HU of the slices below and above the (H, W) image, or None."""
    payload = _param(params, "neighbours", dict)
    if payload is None:
        return None
    neighbours = _decode_pixels(context, payload, "neighbours", ndim=3)
    if neighbours.shape != (2,) + tuple(shape):
        raise invalid_params(f"'neighbours' has shape {list(neighbours.shape)}; the {shape[1]}x{shape[0]} image "
                             f"needs {[2, *shape]}: the slice below it, then the one above, at its size",
                             "send both neighbouring slices uncropped (CTReasonerLib.io.slices.neighbour_slices), "
                             "or none")
    return neighbours


@registry.method("set_image", runs_as_job=True)
def set_image(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """Store a slice (and the slices either side, if sent) in the session; encode it now when the model is
    ready (cached by content hash)."""
    from .sessions import ImageRecord
    pixels = _decode_pixels(context, _param(params, "image", dict, required=True), "image", ndim=2)
    neighbours = _neighbours(context, params, pixels.shape)
    geometry = SliceGeometry.from_wire(_param(params, "geometry", dict), pixels.shape)
    record = ImageRecord(_content_id(pixels, geometry, neighbours), pixels, geometry, _window(params), neighbours)
    context.session.add_image(record)
    started = time.perf_counter()
    embedding = "deferred"
    if context.engine.state == "ready":
        embedding = context.engine.prepare_image(record.pixels)
    return {"image_id": record.image_id, "shape": list(pixels.shape), "embedding": embedding,
            "timings_ms": {"embedding": round((time.perf_counter() - started) * 1000.0, 3)}}


@registry.method("set_volume", runs_as_job=True)
def set_volume(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """Store a (K, H, W) stack once for ``propagate``."""
    from .sessions import VolumeRecord
    pixels = _decode_pixels(context, _param(params, "volume", dict, required=True), "volume", ndim=3)
    if not 1 <= pixels.shape[0] <= context.service.limits.max_volume_slices:
        raise invalid_params(f"'volume' has {pixels.shape[0]} slices; at most "
                             f"{context.service.limits.max_volume_slices} are accepted")
    geometry = SliceGeometry.from_wire(_param(params, "geometry", dict), pixels.shape[1:])
    record = VolumeRecord(_content_id(pixels, geometry), pixels, geometry.ijk_to_ras, _window(params))
    context.session.add_volume(record)
    return {"volume_id": record.volume_id, "shape": list(pixels.shape)}


@registry.method("chat", runs_as_job=True, needs_model=True)
def chat(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    record = context.session.image(_param(params, "image_id", str, required=True))
    message = _param(params, "message", str, required=True).strip()
    if not message:
        raise invalid_params("the message is empty", "ask a question, e.g. 'segment the liver'")
    limit = context.service.limits.max_message_chars
    if len(message) > limit:
        raise invalid_params(f"the message has {len(message)} characters; at most {limit} are accepted")
    history = _history(_param(params, "history", list, default=[]))
    options = _param(params, "options", dict, default={})
    closer_look = _param(options, "closer_look", bool)
    score_threshold = _number(options, "score_threshold", low=0.0, high=1.0)
    mask_encoding, with_probability = _mask_options(options)
    result = context.engine.chat(record.pixels, message, history, closer_look=closer_look,
                                 score_threshold=score_threshold, return_probabilities=with_probability,
                                 job=context.job, neighbours=record.neighbours)
    _remember_masks(context, record.image_id, result.masks)
    return encode_chat_result(result, mask_encoding, with_probability)


def _history(history: List[Any]) -> List[Tuple[str, str]]:
    turns = []
    for index, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise invalid_params(f"history[{index}] must be a [question, answer] pair of strings")
        turns.append((turn[0], turn[1]))
    return turns


@registry.method("refine", runs_as_job=True, needs_model=True)
def refine(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """Points/box/previous-mask prompts through the segmenter's prompt encoder on the cached embedding."""
    record = context.session.image(_param(params, "image_id", str, required=True))
    shape = record.pixels.shape
    points = _param(params, "points", list, default=[])
    labels = _param(params, "labels", list, default=[])
    try:
        points_xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise invalid_params("'points' must be a list of [x, y] pairs") from None
    if len(labels) != len(points_xy) or not all(v in (0, 1) and not isinstance(v, bool) for v in labels):
        raise invalid_params(f"'labels' must hold one 0/1 per point ({len(points_xy)} points, {len(labels)} labels)")
    inside = (points_xy >= 0).all(axis=1) & (points_xy[:, 0] < shape[1]) & (points_xy[:, 1] < shape[0])
    if not np.isfinite(points_xy).all() or not inside.all():
        raise invalid_params(f"'points' must lie inside the {shape[1]}x{shape[0]} image")
    box = None if params.get("box") is None else _xyxy(params["box"], "box", shape)
    organ, logits, _ = context.session.previous_prediction(record.image_id, _organ_key(params.get("organ")))
    use_previous = bool(_param(params, "use_previous_mask", bool, default=False))
    if use_previous and logits is None:
        raise invalid_params(f"there is no previous mask{f' of {organ}' if organ else ''} on this image",
                             "run chat (or refine without use_previous_mask) first")
    if not len(points_xy) and box is None and not use_previous:
        raise invalid_params("refine needs points, a box or use_previous_mask")
    started = time.perf_counter()
    prediction = context.engine.refine(record.pixels, points_xy, np.asarray(labels, dtype=np.int64), box,
                                       logits if use_previous else None, organ or "", job=context.job)
    elapsed = (time.perf_counter() - started) * 1000.0
    _remember_masks(context, record.image_id, [prediction])
    with_probability = bool(_param(params, "return_probabilities", bool, default=False))
    return {"mask": encode_mask_entry(prediction, "bitpack", with_probability),
            "timings_ms": {"refine": round(elapsed, 3)}}


@registry.method("closer_look", runs_as_job=True, needs_model=True)
def closer_look(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """Round 2 on an explicit ROI, or on the ROI around the latest mask (of ``organ``)."""
    record = context.session.image(_param(params, "image_id", str, required=True))
    organ, _, previous_mask = context.session.previous_prediction(record.image_id, _organ_key(params.get("organ")))
    query = _param(params, "query", str)
    roi = None if params.get("roi_xyxy") is None else _xyxy(params["roi_xyxy"], "roi_xyxy", record.pixels.shape)
    if roi is None and previous_mask is None:
        raise invalid_params("closer_look needs 'roi_xyxy' or an earlier mask on this image",
                             "run chat first or pass roi_xyxy")
    if organ is None and not query:
        raise invalid_params("closer_look needs 'organ' or 'query' to know what to look at")
    result = context.engine.closer_look(record.pixels, roi, previous_mask, organ, query, job=context.job,
                                        neighbours=record.neighbours)
    _remember_masks(context, record.image_id, result.masks)
    return encode_chat_result(result, *_mask_options(params))


@registry.method("propagate", runs_as_job=True, needs_model=True)
def propagate(context: CallContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """3D from a seed slice over an uploaded volume (or a list of uploaded slices), with progress."""
    stack, volume_id, k_offset, neighbours_of = _propagation_stack(context, params)
    depth, height, width = stack.shape
    first, last = k_offset, k_offset + depth - 1
    seed_k = _param(params, "seed_k", int, required=True)
    if not first <= seed_k <= last:
        raise invalid_params(f"'seed_k' {seed_k} is outside the stack's slices [{first}, {last}]")
    direction = _param(params, "direction", str, default="both")
    if direction not in DIRECTIONS:
        raise invalid_params(f"'direction' must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if params.get("slice_range") is not None:
        slice_range = _param(params, "slice_range", list)
        if len(slice_range) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in slice_range):
            raise invalid_params("'slice_range' must be [first, last] slice indices (inclusive)")
        first, last = max(first, min(slice_range)), min(last, max(slice_range))
        if not first <= seed_k <= last:
            raise invalid_params(f"'seed_k' {seed_k} is outside slice_range [{first}, {last}]")
    strategy = _param(params, "strategy", str, default="requery")
    if strategy not in context.engine.propagate_strategies():
        raise invalid_params(f"strategy {strategy!r} is not available on this server",
                             f"available: {', '.join(context.engine.propagate_strategies())}")
    organ = _organ_key(params.get("organ"))
    query = _param(params, "query", str)
    if query is not None and not query.strip():
        raise invalid_params("the query is empty")
    seed_mask = None
    if params.get("seed_mask") is not None:
        seed_mask = decode_mask(params["seed_mask"], name="seed_mask", shape=(height, width))
    if organ is None and not query:
        raise invalid_params("propagate needs 'organ' or 'query'")
    if strategy == "sam2" and seed_mask is None:
        raise invalid_params("strategy 'sam2' needs a 'seed_mask' on slice seed_k")
    started = time.perf_counter()
    outcome = context.engine.propagate(stack, seed_k - k_offset, (first - k_offset, last - k_offset), direction,
                                       strategy, organ=organ, query=query, seed_mask=seed_mask, job=context.job,
                                       neighbours_of=neighbours_of)
    return {"volume_id": volume_id, "organ": outcome.organ, "stopped": outcome.stopped,
            "slices": [{"k": int(k) + k_offset, "score": _finite_or_none(score), "mask": encode_mask(mask)}
                       for k, (mask, score) in sorted(outcome.masks.items())],
            "timings_ms": {"total": round((time.perf_counter() - started) * 1000.0, 3)}}


def _propagation_stack(context: CallContext, params: Dict[str, Any]) -> Tuple[np.ndarray, str, int, NeighboursOf]:
    """(stack (K, H, W), its id, k of its first slice, the neighbours of each of its slices): an uploaded
    volume (k from 0; neighbours from the volume itself), or uploaded slices that are consecutive in their
    geometry's k (each with the neighbours it was sent with)."""
    if params.get("volume_id") is not None:
        record = context.session.volume(_param(params, "volume_id", str))
        return record.pixels, record.volume_id, 0, _volume_neighbours(context, record)
    image_ids = _param(params, "image_ids", list)
    if not image_ids:
        raise invalid_params("propagate needs 'volume_id' or 'image_ids'")
    records = [context.session.image(image_id) for image_id in image_ids]
    if len({r.pixels.shape for r in records}) != 1:
        raise invalid_params("the slices in 'image_ids' have different shapes")
    ks = [r.geometry.k for r in records]
    if ks != list(range(ks[0], ks[0] + len(ks))):
        raise invalid_params("'image_ids' must be consecutive slices in k order (their geometry.k values)")
    return np.stack([r.pixels for r in records]), ",".join(image_ids), ks[0], lambda k: records[k].neighbours


def _volume_neighbours(context: CallContext, record) -> NeighboursOf:
    """Slice k of an uploaded volume -> its neighbours at the model's distance, k's spacing from the volume's
    geometry (clamped at the ends of the volume sent); None throughout when the model reads none."""
    distance = context.engine.neighbour_distance_mm
    if distance is None:
        return lambda k: None
    offset = neighbour_offset(ijk_spacing(record.ijk_to_ras)[2], distance)
    return lambda k: neighbour_slices(record.pixels, k, offset)
