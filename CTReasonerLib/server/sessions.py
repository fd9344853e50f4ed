"""Per-client sessions: the images and volumes a client uploaded and its previous-mask logits.

Every piece of per-client state lives in a :class:`Session`, so two clients never see each other's images,
masks or jobs. The image-embedding cache is the engine's (content-addressed, shared, byte-bounded): equal
pixels give equal features whoever sent them, so sharing it mixes no state and saves encoder runs.
Sessions expire after ``idle_timeout_s`` without a request; at most ``max_sessions`` exist at once.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..client.geometry import SliceGeometry
from ..client.spec import ErrorCode
from .protocol import RpcError


@dataclass
class ImageRecord:
    """One uploaded slice. pixels: (H, W) float32 HU; window: (center, width) or None; neighbours: (2, H, W)
    float32 HU of the slices below and above it that the model's pixel network reads, or None (not sent)."""
    image_id: str
    pixels: np.ndarray
    geometry: SliceGeometry
    window: Optional[Tuple[float, float]]
    neighbours: Optional[np.ndarray] = None


@dataclass
class VolumeRecord:
    """One uploaded stack. pixels: (K, H, W) float32 HU; ijk_to_ras: (4, 4)."""
    volume_id: str
    pixels: np.ndarray
    ijk_to_ras: np.ndarray
    window: Optional[Tuple[float, float]]


class _BoundedStore:
    """Insertion/LRU-ordered dict holding at most ``capacity`` entries."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: "OrderedDict[str, object]" = OrderedDict()

    def put(self, key: str, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: str):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Session:
    """State of one client. ``lock`` guards every field below it."""
    session_id: str
    transport: str
    client: Dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    images: _BoundedStore = field(default_factory=lambda: _BoundedStore(64), repr=False)
    volumes: _BoundedStore = field(default_factory=lambda: _BoundedStore(2), repr=False)
    # (image_id, organ) -> (1, h, w) low-res logits and the full-res mask of the latest prediction
    previous: Dict[Tuple[str, str], Tuple[Optional[np.ndarray], np.ndarray]] = field(default_factory=dict, repr=False)
    last_organ: Dict[str, str] = field(default_factory=dict, repr=False)

    PREVIOUS_KEPT = 256

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def add_image(self, record: ImageRecord) -> None:
        with self.lock:
            self.images.put(record.image_id, record)

    def image(self, image_id) -> ImageRecord:
        return self._lookup(self.images, image_id, "image")

    def add_volume(self, record: VolumeRecord) -> None:
        with self.lock:
            self.volumes.put(record.volume_id, record)

    def volume(self, volume_id) -> VolumeRecord:
        return self._lookup(self.volumes, volume_id, "volume")

    def _lookup(self, store, upload_id, kind: str):
        with self.lock:
            record = store.get(upload_id) if isinstance(upload_id, str) else None
        if record is None:
            raise RpcError(ErrorCode.UNKNOWN_IMAGE, f"unknown {kind} id {upload_id!r} in this session",
                           f"call set_{kind} first (the server may have restarted or evicted it)")
        return record

    def remember_prediction(self, image_id: str, organ: str, logits_lowres: Optional[np.ndarray],
                            mask: np.ndarray) -> None:
        with self.lock:
            self.previous.pop((image_id, organ), None)
            self.previous[(image_id, organ)] = (logits_lowres, mask)
            while len(self.previous) > self.PREVIOUS_KEPT:
                self.previous.pop(next(iter(self.previous)))
            self.last_organ[image_id] = organ

    def previous_prediction(self, image_id: str, organ: Optional[str]):
        """(organ, logits_lowres, mask) of the latest prediction on the image (for ``organ`` if given)."""
        with self.lock:
            organ = organ or self.last_organ.get(image_id)
            entry = self.previous.get((image_id, organ)) if organ else None
        if entry is None:
            return organ, None, None
        return organ, entry[0], entry[1]


class SessionManager:
    """Creates, finds and expires sessions; thread-safe."""

    def __init__(self, max_sessions: int = 8, idle_timeout_s: float = 1800.0):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: Dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, transport: str, client: Optional[Dict[str, str]] = None) -> Session:
        self.expire_idle()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise RpcError(ErrorCode.SESSION_LIMIT,
                               f"the server already serves its maximum of {self.max_sessions} sessions",
                               "close another client, wait for idle sessions to expire, or raise --max-sessions")
            session = Session(uuid.uuid4().hex, transport, dict(client or {}))
            self._sessions[session.session_id] = session
            return session

    def get(self, session_id: Optional[str]) -> Session:
        with self._lock:
            session = self._sessions.get(session_id) if session_id else None
        if session is None:
            raise RpcError(ErrorCode.UNKNOWN_SESSION,
                           "no session with this id (it expired after the idle timeout or the server restarted)"
                           if session_id else "this request carries no session id",
                           "call initialize and send its session_id in the X-CTReasoner-Session header")
        session.touch()
        return session

    def close(self, session_id: str) -> Optional[Session]:
        with self._lock:
            return self._sessions.pop(session_id, None)

    def expire_idle(self, now: Optional[float] = None) -> List[Session]:
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [s for s in self._sessions.values() if now - s.last_seen > self.idle_timeout_s]
            for session in expired:
                del self._sessions[session.session_id]
        return expired

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
