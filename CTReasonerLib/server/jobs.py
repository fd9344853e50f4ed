"""Background jobs: every model call runs on ONE worker thread, can report progress and can be cancelled.

One worker keeps model calls serial (no two forwards compete for the same weights or GPU memory), while the
transport thread stays free to answer ``ping`` and ``cancel``. A job cancelled while still queued is answered
at once; a running job stops at its next ``check_cancelled()`` (between stages or slices).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Tuple

from ..client.spec import ErrorCode
from .protocol import JobCancelled, RpcError, progress_message

log = logging.getLogger(__name__)

Notify = Callable[[dict], None]
Finish = Callable[[Any, Optional[BaseException]], None]


class Job:
    """One cancellable unit of model work, owned by a session."""

    def __init__(self, job_id: str, session_id: str, method: str, notify: Notify, finish: Finish):
        self.job_id = job_id
        self.session_id = session_id
        self.method = method
        self._notify = notify
        self._finish = finish
        self._cancelled = threading.Event()
        self._state_lock = threading.Lock()
        self.state = "queued"          # queued -> running -> finished
        self.on_finished: Callable[[], None] = lambda: None   # JobManager.submit: leave its registry

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled(self.job_id)

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.check_cancelled()
        try:
            self._notify(progress_message(self.job_id, done, total, message))
        except Exception:  # a client that went away must not kill the job's bookkeeping
            log.debug("progress notification for %s not delivered", self.job_id, exc_info=True)

    def start(self) -> bool:
        with self._state_lock:
            if self.state != "queued":
                return False
            self.state = "running"
            return True

    def finish(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        """Answer the request exactly once, after the job has left its manager: a client that sees the
        answer and then asks ``ping`` must not find the job still counted as active."""
        with self._state_lock:
            if self.state == "finished":
                return
            self.state = "finished"
        self.on_finished()
        self._finish(result, error)

    def cancel(self) -> None:
        self._cancelled.set()
        with self._state_lock:
            queued = self.state == "queued"
        if queued:
            self.finish(error=JobCancelled(self.job_id))


class JobManager:
    """Runs jobs on a single model worker thread; finds them by (session, job id) for ``cancel``."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctreasoner-model")
        self._jobs: Dict[Tuple[str, str], Job] = {}
        self._lock = threading.Lock()

    def submit(self, job: Job, work: Callable[[Job], Any]) -> None:
        key = (job.session_id, job.job_id)
        with self._lock:
            if key in self._jobs:
                raise RpcError(ErrorCode.INVALID_PARAMS, f"job id {job.job_id!r} is already in use in this session",
                               "use a fresh job_id per call (the client library does this)")
            self._jobs[key] = job
        job.on_finished = lambda: self._forget(key)
        self._executor.submit(self._run, job, work)

    def _forget(self, key: Tuple[str, str]) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        """Every path ends in ``job.finish``, which drops the job from the registry."""
        if not job.start():
            return  # cancelled while queued: already answered
        try:
            result = work(job)
        except BaseException as exc:  # reported to this request only; the worker keeps serving
            job.finish(error=exc)
        else:
            if job.cancelled:
                job.finish(error=JobCancelled(job.job_id))
            else:
                job.finish(result=result)

    def cancel(self, session_id: str, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get((session_id, job_id))
        if job is None:
            return False
        job.cancel()
        return True

    def cancel_session(self, session_id: str) -> int:
        with self._lock:
            jobs = [job for (sid, _), job in self._jobs.items() if sid == session_id]
        for job in jobs:
            job.cancel()
        return len(jobs)

    def active(self, session_id: Optional[str] = None) -> int:
        with self._lock:
            return sum(1 for (sid, _) in self._jobs if session_id is None or sid == session_id)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        self._executor.shutdown(wait=wait, cancel_futures=True)
