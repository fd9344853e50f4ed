"""``ctreasoner serve``: the JSON-RPC backend over stdio (local subprocess or ssh) or HTTP.

Examples::

    ctreasoner serve --stdio                                   # Slicer starts this itself
    ssh gpu-host ctreasoner serve --stdio --device cuda        # remote GPU, no open port
    ctreasoner serve --http --port 8765 --token-file ~/.ctreasoner-token
    ctreasoner serve --check --device cuda                     # verify model, device, dependencies

Logs go to stderr; in stdio mode stdout carries only the protocol.
"""
from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from typing import Optional

from ..errors import ConfigError, InputFileError

log = logging.getLogger("CTReasonerLib.serve")

TOKEN_ENV = "CTREASONER_TOKEN"
MIN_TOKEN_CHARS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdio", action="store_true", help="newline-delimited JSON-RPC on stdin/stdout")
    mode.add_argument("--http", action="store_true", help="JSON-RPC over HTTP (POST /rpc)")
    mode.add_argument("--check", action="store_true",
                      help="verify the model, device and dependencies, print a report and exit 0/1")
    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP bind address (default 127.0.0.1; anything else requires a token)")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port (0 picks a free one; default 8765)")
    parser.add_argument("--token-file", help=f"file holding the bearer token (else ${TOKEN_ENV})")
    parser.add_argument("--model", default=None,
                        help="model folder (default: the bundled CTReasoner-Tiny), or 'tiny-random' for a "
                             "randomly initialised tiny model (tests)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--cache-mb", type=float, default=512.0, help="image-embedding cache cap in MiB (default 512)")
    parser.add_argument("--max-sessions", type=int, default=8, help="concurrent HTTP sessions (default 8)")
    parser.add_argument("--idle-timeout", type=float, default=1800.0,
                        help="seconds after which an idle HTTP session is dropped (default 1800)")
    parser.add_argument("--max-request-mb", type=float, default=256.0,
                        help="largest accepted request in MiB (default 256)")


def read_token(token_file: Optional[str]) -> Optional[str]:
    """The bearer token from ``token_file`` or $CTREASONER_TOKEN; None when neither is set."""
    if token_file:
        try:
            with open(token_file, "r", encoding="utf-8") as handle:
                token = handle.read().strip()
            mode = os.stat(token_file).st_mode
        except OSError as exc:
            raise InputFileError(f"cannot read the token file {token_file}: {exc}",
                                 "create it, e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE") from None
        if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("token file %s is readable by other users; chmod 600 it", token_file)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
        if token is None:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}",
                          "python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    return token


def _build_service(args, transport: str):
    from ..server.engine import Engine
    from ..server.methods import registry
    from ..server.service import Limits, Service
    from ..server.sessions import SessionManager
    from .. import __version__

    if args.max_sessions < 1 or args.idle_timeout <= 0 or args.cache_mb <= 0 or args.max_request_mb <= 0:
        raise ConfigError("--max-sessions, --idle-timeout, --cache-mb and --max-request-mb must be positive")
    engine = Engine(args.model, device=args.device, dtype=args.dtype, cache_bytes=int(args.cache_mb * 2**20))
    sessions = SessionManager(max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout)
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20))
    return Service(engine, registry, transport, sessions, limits, server_version=__version__)


def run(args) -> int:
    if args.check:
        from ..server.engine import check_environment
        ok, report = check_environment(args.model, args.device, args.dtype)
        print(report)
        return 0 if ok else 1
    if args.stdio:
        from ..server.stdio import protocol_stdout, serve_stdio
        channel = protocol_stdout()  # before anything can print
        service = _build_service(args, "stdio")
        service.engine.start_loading()
        code = serve_stdio(service, sys.stdin.buffer, channel)
        if service.jobs.active():
            # A model call is still running and cannot be interrupted; don't wait for it to exit.
            logging.shutdown()
            os._exit(code)
        return code
    from ..server.http import check_bind_allowed, serve_http
    token = read_token(args.token_file)
    check_bind_allowed(args.host, token)
    service = _build_service(args, "http")
    service.engine.start_loading()
    return serve_http(service, args.host, args.port, token)
