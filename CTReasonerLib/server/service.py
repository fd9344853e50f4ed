"""The transport-independent server: one request in, exactly one response out (through ``respond``).

Both transports (stdio, HTTP) hand every raw request to :meth:`Service.handle` with two callbacks:
``respond(message)`` for the answer and ``notify(message)`` for progress notifications. Quick methods
(initialize, ping, cancel, shutdown) are answered at once; model methods run as jobs on the model worker
and answer from there. Whatever goes wrong is answered as a JSON-RPC error to that request only.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..client.spec import ErrorCode
from .jobs import Job, JobManager
from .protocol import (MethodRegistry, RpcError, error_message, parse_message, result_message,
                       rpc_error_from_exception, validate_request)
from .sessions import Session, SessionManager

log = logging.getLogger(__name__)

Send = Callable[[dict], None]


@dataclass(frozen=True)
class Limits:
    """Request limits. max_request_bytes bounds one encoded request (a base64 volume is 4/3 of its bytes)."""
    max_request_bytes: int = 256 * 2**20
    max_image_side: int = 4096
    max_volume_slices: int = 2048
    max_message_chars: int = 4000


@dataclass
class CallContext:
    """What a method handler may use: the service, the caller's session and, for jobs, the job."""
    service: "Service"
    session: Optional[Session]
    request_id: Any
    job: Optional[Job] = None

    @property
    def engine(self):
        return self.service.engine


class Service:
    """Dispatches JSON-RPC requests to the handlers in ``methods.py``.

    transport: "stdio" (one session for the whole process; ``shutdown`` ends the process) or "http"
    (``initialize`` opens a session; ``shutdown`` closes only the caller's session).
    """

    def __init__(self, engine, registry: MethodRegistry, transport: str, sessions: Optional[SessionManager] = None,
                 limits: Limits = Limits(), server_version: str = ""):
        self.engine = engine
        self.registry = registry
        self.transport = transport
        self.sessions = sessions if sessions is not None else SessionManager()
        self.limits = limits
        self.server_version = server_version
        self.jobs = JobManager()
        self.shutdown_requested = threading.Event()
        self.default_session: Optional[Session] = None
        if transport == "stdio":
            self.default_session = self.sessions.create("stdio")

    def session_for(self, session_id: Optional[str]) -> Session:
        if self.default_session is not None:
            self.default_session.touch()
            return self.default_session
        return self.sessions.get(session_id)

    def close_session(self, session: Session) -> None:
        self.jobs.cancel_session(session.session_id)
        self.sessions.close(session.session_id)

    def expire_idle_sessions(self) -> int:
        expired = self.sessions.expire_idle()
        for session in expired:
            log.info("session %s expired after %.0f s idle", session.session_id[:8], self.sessions.idle_timeout_s)
            self.jobs.cancel_session(session.session_id)
        return len(expired)

    def handle(self, raw: Any, session_id: Optional[str], respond: Send, notify: Send,
               on_job: Optional[Callable[[Job], None]] = None) -> bool:
        """Serve one raw request (bytes, str or an already-decoded dict).

        ``on_job`` receives the job a model method was queued as, so a transport can cancel it when its
        client goes away. Returns whether ``respond`` will be called (not for JSON-RPC notifications, i.e.
        requests without id).
        """
        request_id = None
        try:
            message = raw if isinstance(raw, dict) else parse_message(raw)
            if isinstance(message, dict):
                request_id = message.get("id") if isinstance(message.get("id"), (int, str)) else None
            request_id, method, params = validate_request(message)
        except RpcError as exc:
            respond(error_message(request_id, exc))
            return True
        is_notification = request_id is None

        def answer(result: Any = None, error: Optional[BaseException] = None) -> None:
            if is_notification:
                return
            if error is not None:
                respond(error_message(request_id, rpc_error_from_exception(error)))
            else:
                respond(result_message(request_id, result))

        try:
            spec = self.registry.get(method)
            session = self.session_for(session_id) if spec.needs_session else self._optional_session(session_id)
            if spec.needs_model:
                self.engine.require_ready()
            context = CallContext(self, session, request_id)
            if not spec.runs_as_job:
                answer(spec.handler(context, params))
                return not is_notification
            job_id = params.get("job_id", f"request-{request_id}")
            if not isinstance(job_id, str) or not job_id:
                raise RpcError(ErrorCode.INVALID_PARAMS, "'job_id' must be a non-empty string")
            job = Job(job_id, session.session_id, method, notify, answer)
            context.job = job
            self.jobs.submit(job, lambda running_job: spec.handler(context, params))
            if on_job is not None:
                on_job(job)
        except BaseException as exc:  # noqa: BLE001 - every failure is answered to its request
            answer(error=exc)
        return not is_notification

    def _optional_session(self, session_id: Optional[str]) -> Optional[Session]:
        if self.default_session is not None:
            return self.default_session
        try:
            return self.sessions.get(session_id) if session_id else None
        except RpcError:
            return None

    def close(self) -> None:
        self.jobs.shutdown(wait=False)
