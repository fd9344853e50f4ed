"""JSON-RPC 2.0 framing, the method registry and the mapping from exceptions to error codes.

Standard library only (plus the shared wire contract in ``CTReasonerLib.client.spec``), so both transports
and the tests can use it without the model. Error codes are documented in ``docs/protocol.md``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..client.encoding import PayloadError
from ..client.spec import PROGRESS_NOTIFICATION, ErrorCode
from ..errors import CTReasonerError, ModelError

log = logging.getLogger(__name__)

JSON_SEPARATORS = (",", ":")


class RpcError(Exception):
    """An error answered to one request; the server keeps running."""

    def __init__(self, code: int, message: str, hint: str = "", data: Optional[Dict[str, Any]] = None):
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.data = dict(data or {})
        if hint:
            self.data["hint"] = hint

    def to_dict(self) -> Dict[str, Any]:
        error: Dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            error["data"] = self.data
        return error


class JobCancelled(RpcError):
    def __init__(self, job_id: str):
        super().__init__(ErrorCode.CANCELLED, f"job {job_id} was cancelled")


def invalid_params(message: str, hint: str = "") -> RpcError:
    return RpcError(ErrorCode.INVALID_PARAMS, message, hint)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    runs_as_job: runs on the model worker as a cancellable job (else answered at once, e.g. ping/cancel).
    needs_model: refused with MODEL_NOT_LOADED while the model is loading or failed to load.
    needs_session: refused with UNKNOWN_SESSION without a valid session (HTTP); initialize and ping are not.
    """
    name: str
    handler: Callable[..., Any]
    runs_as_job: bool
    needs_model: bool
    needs_session: bool


class MethodRegistry:
    """Name -> MethodSpec; handlers are registered with the ``method`` decorator."""

    def __init__(self):
        self._methods: Dict[str, MethodSpec] = {}

    def method(self, name: str, runs_as_job: bool = False, needs_model: bool = False, needs_session: bool = True):
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._methods:
                raise ValueError(f"method {name!r} registered twice")
            self._methods[name] = MethodSpec(name, handler, runs_as_job, needs_model, needs_session)
            return handler
        return register

    def get(self, name: str) -> MethodSpec:
        spec = self._methods.get(name)
        if spec is None:
            raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"unknown method {name!r}",
                           f"available methods: {', '.join(sorted(self._methods))}")
        return spec

    @property
    def names(self):
        return sorted(self._methods)


def parse_message(raw: Any) -> Any:
    """bytes/str -> decoded JSON; raises PARSE_ERROR for anything that is not JSON."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RpcError(ErrorCode.PARSE_ERROR, f"request is not UTF-8 text ({exc})") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise RpcError(ErrorCode.PARSE_ERROR, f"request is not valid JSON ({exc})",
                       "send one JSON-RPC 2.0 object per line") from None


def validate_request(message: Any) -> Tuple[Any, str, Dict[str, Any]]:
    """A decoded message -> (id, method, params). A missing id marks a notification (answered with nothing)."""
    if not isinstance(message, dict):
        raise RpcError(ErrorCode.INVALID_REQUEST, f"a request must be a JSON object, got {type(message).__name__}",
                       "batch requests are not supported; send one object per message")
    request_id = message.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (int, str))):
        raise RpcError(ErrorCode.INVALID_REQUEST, f"'id' must be a string or an integer, got {request_id!r}")
    if message.get("jsonrpc") != "2.0":
        raise RpcError(ErrorCode.INVALID_REQUEST, "'jsonrpc' must be \"2.0\"")
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(ErrorCode.INVALID_REQUEST, "'method' must be a non-empty string")
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(ErrorCode.INVALID_REQUEST, "'params' must be an object (named parameters)")
    return request_id, method, params


def result_message(request_id: Any, result: Any) -> Dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_message(request_id: Any, error: RpcError) -> Dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_dict()}


def progress_message(job_id: str, done: int, total: int, message: str = "") -> Dict[str, Any]:
    return {"jsonrpc": "2.0", "method": PROGRESS_NOTIFICATION,
            "params": {"job_id": job_id, "done": int(done), "total": int(total), "message": message}}


def encode_line(message: Dict[str, Any]) -> bytes:
    """One message as a newline-terminated JSON line (NaN is not JSON: refuse to write it)."""
    return json.dumps(message, separators=JSON_SEPARATORS, allow_nan=False).encode("utf-8") + b"\n"


def rpc_error_from_exception(exc: BaseException) -> RpcError:
    """Map any exception raised while serving a request to the error answered for it."""
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, PayloadError):
        return RpcError(ErrorCode.INVALID_PARAMS, exc.message, exc.hint)
    if isinstance(exc, ModelError):
        return RpcError(ErrorCode.MODEL_FAILURE, exc.message, exc.hint)
    if isinstance(exc, CTReasonerError):
        return RpcError(ErrorCode.INVALID_PARAMS, exc.message, exc.hint)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return RpcError(ErrorCode.MODEL_FAILURE, f"the model ran out of memory ({type(exc).__name__})",
                        "use a smaller slice/ROI or free GPU memory; the server is still running")
    log.exception("model failure")
    return RpcError(ErrorCode.MODEL_FAILURE, f"the model failed: {type(exc).__name__}: {exc}",
                    "the server is still running; see its log for the traceback")
