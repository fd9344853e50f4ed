"""JSON-RPC over HTTP: a starlette ASGI app served by uvicorn.

``POST /rpc`` takes one JSON-RPC request. With ``Accept: application/x-ndjson`` the answer streams progress
notifications, then the response, one JSON object per line; otherwise it is the response alone.
``GET /health`` answers ``{"status": "ok"}`` without authentication (for load balancers).

Safety: a bearer token is required whenever one is configured; binding anything but a loopback address
without a token is refused; request bodies are capped. TLS is left to a reverse proxy or an SSH tunnel
(docs/protocol.md), so the token never crosses a network in clear text.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import threading
from typing import Optional

from ..client.spec import NDJSON_CONTENT_TYPE, SESSION_HEADER, ErrorCode
from ..errors import ConfigError
from .protocol import RpcError, encode_line, error_message
from .service import Service

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"


class _BodyTooLarge(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


def check_bind_allowed(host: str, token: Optional[str]) -> None:
    """Refuse to expose an unauthenticated model server beyond this machine."""
    if not token and not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host} without a token: anyone on the network could use "
                          "this server",
                          "pass --token-file FILE (or set CTREASONER_TOKEN), or bind 127.0.0.1 and use an "
                          "SSH tunnel")


def _json_response(message: dict, status: int = 200, headers: Optional[dict] = None):
    from starlette.responses import Response
    return Response(encode_line(message), status_code=status, media_type=JSON_CONTENT_TYPE, headers=headers)


async def _wait_for_disconnect(request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service, token: Optional[str] = None):
    """The ASGI application. ``token``: the bearer token every /rpc request must carry (None: no auth)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    expected = f"Bearer {token}".encode("utf-8") if token else None
    limit = service.limits.max_request_bytes

    async def read_body(request: Request) -> bytes:
        """The body, or _BodyTooLarge past ``limit``. An oversized body is still read (and dropped, so memory
        stays bounded): answering before the client finished sending would reach it as a broken pipe instead
        of a clear 413."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif chunks:
                chunks.clear()
        if size > limit:
            raise _BodyTooLarge()
        return b"".join(chunks)

    async def rpc(request: Request):
        if expected is not None:
            supplied = request.headers.get("authorization", "").encode("utf-8")
            if not hmac.compare_digest(supplied, expected):
                return _json_response(error_message(None, RpcError(
                    ErrorCode.UNAUTHORIZED, "missing or wrong bearer token",
                    "send 'Authorization: Bearer <token>' with the server's token")),
                    status=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            body = await read_body(request)
        except _BodyTooLarge:
            return _json_response(error_message(None, RpcError(
                ErrorCode.PAYLOAD_TOO_LARGE, f"request larger than the limit of {limit} bytes",
                "send one slice or an ROI crop, or raise the server's --max-request-mb")), status=413)

        loop = asyncio.get_running_loop()
        messages: "asyncio.Queue" = asyncio.Queue()
        jobs: list = []

        def enqueue(kind: str):
            return lambda message: loop.call_soon_threadsafe(messages.put_nowait, (kind, message))

        expects_response = await run_in_threadpool(
            service.handle, body, request.headers.get(SESSION_HEADER), enqueue("response"), enqueue("notification"),
            jobs.append)
        if not expects_response:
            return Response(status_code=204)

        def client_gone():
            # Nobody will read the answer: stop the model work instead of letting it hold the worker.
            for job in jobs:
                if job.state != "finished":
                    log.info("client disconnected: cancelling job %s (%s)", job.job_id, job.method)
                    job.cancel()

        if NDJSON_CONTENT_TYPE not in request.headers.get("accept", ""):
            disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
            try:
                while True:
                    answer = asyncio.ensure_future(messages.get())
                    await asyncio.wait({answer, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                    if not answer.done():
                        answer.cancel()
                        client_gone()
                        return Response(status_code=499)  # never delivered; logged by no one
                    kind, message = answer.result()
                    if kind == "response":
                        return _json_response(message)
            finally:
                disconnected.cancel()

        async def stream():
            answered = False
            try:
                while True:
                    kind, message = await messages.get()
                    yield encode_line(message)
                    if kind == "response":
                        answered = True
                        return
            finally:  # starlette cancels the stream when the client disconnects
                if not answered:
                    client_gone()

        return StreamingResponse(stream(), media_type=NDJSON_CONTENT_TYPE)

    async def health(request: Request):
        return _json_response({"status": "ok"})

    return Starlette(routes=[Route("/rpc", rpc, methods=["POST"]), Route("/health", health, methods=["GET"])])


def _expire_sessions_forever(service: Service, stop: threading.Event) -> None:
    interval = max(1.0, min(60.0, service.sessions.idle_timeout_s / 4.0))
    while not stop.wait(interval):
        service.expire_idle_sessions()


def serve_http(service: Service, host: str = "127.0.0.1", port: int = 8765, token: Optional[str] = None) -> int:
    """Serve until interrupted. Logs the bound address (port 0 picks a free port) to stderr."""
    import uvicorn

    check_bind_allowed(host, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}", "choose another --port") from None
    sock.listen(2048)  # accept (queue) connections from the moment the address is logged
    bound_port = sock.getsockname()[1]
    if not token:
        log.warning("no token configured: any local user can use this server (loopback only)")
    config = uvicorn.Config(create_app(service, token), log_level="warning", access_log=False,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    stop = threading.Event()
    threading.Thread(target=_expire_sessions_forever, args=(service, stop), daemon=True,
                     name="ctreasoner-session-reaper").start()
    display_host = f"[{host}]" if family == socket.AF_INET6 else host
    log.info("listening on http://%s:%d (POST /rpc)", display_host, bound_port)
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        service.close()
    return 0
