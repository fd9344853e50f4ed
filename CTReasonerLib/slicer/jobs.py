"""Model requests as three steps, so Slicer's UI never blocks and MRML is only touched on the main thread.

``prepare`` (main thread) reads what it needs from the scene into numpy arrays; ``compute`` (a worker thread)
talks to the backend only; ``apply`` (main thread) writes the answer into the scene. Blocking callers run the
three in a row (:meth:`SceneJob.run`); the Widget calls :meth:`start`, polls :meth:`done` from a ``qt.QTimer``
and then :meth:`finish` on the main thread.
"""
from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from ..errors import CTReasonerError

ProgressCallback = Callable[[int, int, str], None]


class JobCancelled(CTReasonerError):
    """The user cancelled the request; nothing was written to the scene."""

    def __init__(self, label: str = "request"):
        super().__init__(f"{label} was cancelled", "")


@dataclass
class JobContext:
    """What ``compute`` may use: cancellation, progress and fresh server job ids (so the server can cancel)."""
    cancel_event: threading.Event = field(default_factory=threading.Event)
    progress_callback: Optional[ProgressCallback] = None
    server_job_ids: List[str] = field(default_factory=list)
    progress: Tuple[int, int, str] = (0, 0, "")

    def new_server_job_id(self) -> str:
        job_id = uuid.uuid4().hex
        self.server_job_ids.append(job_id)
        return job_id

    def report(self, done: int, total: int, message: str = "") -> None:
        self.progress = (int(done), int(total), str(message))
        if self.progress_callback is not None:
            self.progress_callback(int(done), int(total), str(message))

    def check_cancelled(self, label: str = "request") -> None:
        if self.cancel_event.is_set():
            raise JobCancelled(label)


@dataclass
class SceneJob:
    """One model request on one volume."""
    kind: str                                       # "chat", "closerLook", "refine", "propagate"
    volume_node_id: str
    label: str                                      # for the transcript and the undo entry
    compute: Callable[[JobContext], Any]
    apply: Callable[[Any, Optional[str]], Any]      # (computed, conflict policy override) -> outcome
    context: JobContext = field(default_factory=JobContext)
    future: Optional[Future] = None
    computed: Any = None

    def run(self, policy: Optional[str] = None):
        """Compute and apply on the calling thread (the Python-console / batch path)."""
        self.computed = self.compute(self.context)
        return self.apply(self.computed, policy)

    def start(self, executor: ThreadPoolExecutor) -> "SceneJob":
        self.future = executor.submit(self.compute, self.context)
        return self

    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def finish(self, policy: Optional[str] = None):
        """Apply a finished background compute on the calling (main) thread; re-raises its error."""
        if self.future is None:
            raise RuntimeError("finish() called on a job that was never started")
        if self.computed is None:
            self.computed = self.future.result()
        return self.apply(self.computed, policy)

    def cancel(self, client=None) -> None:
        """Stop between slices and ask the server to drop the running request."""
        self.context.cancel_event.set()
        if self.future is not None:
            self.future.cancel()
        if client is not None:
            for job_id in list(self.context.server_job_ids):
                try:
                    client.cancel(job_id)
                except CTReasonerError:
                    pass        # already finished, or the server went away: nothing left to cancel
