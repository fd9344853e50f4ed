"""Newline-delimited JSON-RPC over stdin/stdout: for a local subprocess and for ``ssh HOST ctreasoner serve --stdio``.

stdout carries the protocol only. :func:`protocol_stdout` moves the process's own fd 1 onto stderr so that
a stray ``print`` (ours or a library's, Python or C) can never corrupt the channel. The server exits on
``shutdown`` or when stdin closes (the client, or the ssh connection, went away).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import BinaryIO, Optional

from ..client.spec import ErrorCode
from .protocol import RpcError, encode_line, error_message
from .service import Service

log = logging.getLogger(__name__)

_ID_PATTERN = re.compile(rb'"id"\s*:\s*(-?\d+|"[^"\\]{0,200}")')


def protocol_stdout() -> BinaryIO:
    """A private binary stream on the original stdout; fd 1 and ``sys.stdout`` now go to stderr."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


class LineWriter:
    """Writes whole messages atomically from any thread."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def __call__(self, message: dict) -> None:
        try:
            data = encode_line(message)
        except ValueError as exc:  # e.g. a NaN slipped into a result: answer an error instead
            data = encode_line(error_message(message.get("id"), RpcError(
                ErrorCode.INTERNAL_ERROR, f"the server produced a result that is not valid JSON ({exc})")))
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(data)
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.broken = True


def _read_request(stream: BinaryIO, limit: int):
    """One line (without its newline), or (None, head) when it exceeded ``limit`` bytes (the rest is skipped).

    Returns (b"", None) at end of input.
    """
    line = stream.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, None
    head = line[:512]
    while line and not line.endswith(b"\n"):
        line = stream.readline(1 << 20)
    return None, head


def serve_stdio(service: Service, stdin: Optional[BinaryIO] = None, stdout: Optional[BinaryIO] = None) -> int:
    """Serve until ``shutdown`` or end of input; returns the process exit code."""
    stdin = stdin or sys.stdin.buffer
    write = LineWriter(stdout or protocol_stdout())
    limit = service.limits.max_request_bytes
    log.info("serving JSON-RPC on stdio (one request per line, at most %d MiB)", limit >> 20)
    try:
        while not service.shutdown_requested.is_set():
            line, oversized_head = _read_request(stdin, limit)
            if oversized_head is not None:
                match = _ID_PATTERN.search(oversized_head)
                request_id = None
                if match:
                    token = match.group(1).decode("utf-8", "replace")
                    request_id = token.strip('"') if token.startswith('"') else int(token)
                write(error_message(request_id, RpcError(
                    ErrorCode.PAYLOAD_TOO_LARGE, f"request larger than the limit of {limit} bytes",
                    "send one slice or an ROI crop, or raise the server's --max-request-mb")))
                continue
            if not line:
                log.info("stdin closed; shutting down")
                break
            if not line.strip():
                continue
            service.handle(line, None, write, write)
            if write.broken:
                log.info("stdout closed; shutting down")
                break
    finally:
        service.close()
    return 0
