"""Compact JSON encodings of numpy arrays for the wire (numpy + standard library only).

Every payload states its own encoding, so a reader never guesses:

* dense arrays (CT slices, volumes, quantised probabilities)::

    {"encoding": "base64", "dtype": "int16", "byteorder": "little", "shape": [H, W], "data": "<base64>"}

  ``dtype`` is one of int16, float32, uint8; bytes are little-endian, C order.
* binary masks, bit-packed (``np.packbits``, big bit order, C order, padded to whole bytes)::

    {"encoding": "bitpack", "shape": [H, W], "data": "<base64>"}

* binary masks, run-length encoded (C order, runs alternate starting with a run of zeros, which may be 0)::

    {"encoding": "rle", "shape": [H, W], "counts": [n0, n1, n0, ...]}

* probabilities, quantised to uint8 (value = byte / 255)::

    {"encoding": "base64", "dtype": "uint8", ..., "scale": 0.00392156862745098}
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np

from ..errors import CTReasonerError

ARRAY_DTYPES = ("int16", "float32", "uint8")
MASK_ENCODINGS = ("bitpack", "rle")
PROBABILITY_SCALE = 1.0 / 255.0


class PayloadError(CTReasonerError):
    """A request payload (encoded array, mask or geometry) that is malformed or has the wrong shape, dtype or values."""


def _shape_of(payload: Dict[str, Any], name: str) -> tuple:
    shape = payload.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                        for s in shape):
        raise PayloadError(f"{name}: 'shape' must be a list of non-negative integers, got {shape!r}",
                                "encode arrays with CTReasonerLib.client.encoding")
    return tuple(shape)


def _b64decode(data: Any, name: str) -> bytes:
    if not isinstance(data, str):
        raise PayloadError(f"{name}: 'data' must be a base64 string, got {type(data).__name__}")
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise PayloadError(f"{name}: 'data' is not valid base64 ({exc})") from None


def _require_payload(payload: Any, name: str) -> Dict[str, Any]:
    if not isinstance(payload, dict):
        raise PayloadError(f"{name}: expected an encoded array object, got {type(payload).__name__}",
                                "encode arrays with CTReasonerLib.client.encoding")
    return payload


def encode_array(array: np.ndarray) -> Dict[str, Any]:
    """Dense array -> base64 payload. Supports int16, float32 and uint8."""
    array = np.asarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        raise PayloadError(f"cannot encode dtype {array.dtype}; supported: {', '.join(ARRAY_DTYPES)}",
                                "convert CT slices to int16 HU (or float32)")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"encoding": "base64", "dtype": array.dtype.name, "byteorder": "little",
            "shape": list(array.shape), "data": base64.b64encode(little.tobytes()).decode("ascii")}


def decode_array(payload: Any, name: str = "array", dtypes: Sequence[str] = ARRAY_DTYPES,
                 ndim: Optional[int] = None, require_finite: bool = True) -> np.ndarray:
    """base64 payload -> numpy array (native byte order), validated.

    Raises PayloadError naming ``name`` for a wrong encoding, dtype, shape, byte count, or NaN/inf values.
    """
    payload = _require_payload(payload, name)
    if payload.get("encoding", "base64") != "base64":
        raise PayloadError(f"{name}: encoding {payload.get('encoding')!r} is not 'base64'")
    dtype_name = payload.get("dtype")
    if dtype_name not in dtypes:
        raise PayloadError(f"{name}: dtype {dtype_name!r} is not accepted here; use one of {', '.join(dtypes)}",
                                "send CT slices as int16 Hounsfield units")
    if payload.get("byteorder", "little") != "little":
        raise PayloadError(f"{name}: byteorder must be 'little', got {payload.get('byteorder')!r}")
    shape = _shape_of(payload, name)
    if ndim is not None and len(shape) != ndim:
        raise PayloadError(f"{name}: expected a {ndim}-D array, got shape {list(shape)}")
    raw = _b64decode(payload.get("data"), name)
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise PayloadError(f"{name}: {len(raw)} bytes of data do not match shape {list(shape)} "
                                f"of {dtype_name} ({expected} bytes)")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if require_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise PayloadError(f"{name}: {bad} pixel(s) are NaN or infinite",
                                "replace missing values (e.g. with -1024 HU) before sending")
    return array


def encode_mask(mask: np.ndarray, encoding: str = "bitpack") -> Dict[str, Any]:
    """Boolean mask -> bit-packed or run-length payload."""
    mask = np.asarray(mask).astype(bool, copy=False)
    if encoding == "bitpack":
        packed = np.packbits(mask.ravel(order="C"), bitorder="big")
        return {"encoding": "bitpack", "shape": list(mask.shape),
                "data": base64.b64encode(packed.tobytes()).decode("ascii")}
    if encoding == "rle":
        return {"encoding": "rle", "shape": list(mask.shape), "counts": _run_lengths(mask.ravel(order="C"))}
    raise PayloadError(f"unknown mask encoding {encoding!r}; use one of {', '.join(MASK_ENCODINGS)}")


def _run_lengths(flat: np.ndarray) -> list:
    """Alternating run lengths of a flat bool array, the first run counting zeros."""
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts


def decode_mask(payload: Any, name: str = "mask", shape: Optional[Iterable[int]] = None) -> np.ndarray:
    """Bit-packed or RLE payload -> (H, W) bool array; ``shape`` (if given) must match."""
    payload = _require_payload(payload, name)
    encoding = payload.get("encoding")
    mask_shape = _shape_of(payload, name)
    if shape is not None and tuple(shape) != mask_shape:
        raise PayloadError(f"{name}: shape {list(mask_shape)} does not match the image shape {list(shape)}")
    size = int(np.prod(mask_shape, dtype=np.int64))
    if encoding == "bitpack":
        raw = _b64decode(payload.get("data"), name)
        if len(raw) != (size + 7) // 8:
            raise PayloadError(f"{name}: {len(raw)} packed bytes do not match shape {list(mask_shape)}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=size, bitorder="big")
        return bits.astype(bool).reshape(mask_shape)
    if encoding == "rle":
        counts = payload.get("counts")
        if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
            raise PayloadError(f"{name}: 'counts' must be a list of non-negative integers")
        if sum(counts) != size:
            raise PayloadError(f"{name}: run lengths sum to {sum(counts)}, shape {list(mask_shape)} "
                                    f"needs {size}")
        values = np.arange(len(counts)) % 2 == 1
        return np.repeat(values, counts).reshape(mask_shape)
    raise PayloadError(f"{name}: unknown mask encoding {encoding!r}; use one of {', '.join(MASK_ENCODINGS)}")


def encode_probability(probability: np.ndarray) -> Dict[str, Any]:
    """(H, W) float probabilities in [0, 1] -> uint8-quantised payload (resolution 1/255)."""
    quantised = np.clip(np.rint(np.asarray(probability, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    payload = encode_array(quantised)
    payload["scale"] = PROBABILITY_SCALE
    return payload


def decode_probability(payload: Any, name: str = "probability") -> np.ndarray:
    """uint8-quantised payload -> float32 probabilities."""
    payload = _require_payload(payload, name)
    quantised = decode_array(payload, name=name, dtypes=("uint8",))
    return quantised.astype(np.float32) * np.float32(payload.get("scale", PROBABILITY_SCALE))
