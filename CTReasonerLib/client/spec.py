"""The wire contract both sides share: protocol version, error codes, header and notification names.

Standard library only. The server (``CTReasonerLib.server.protocol``) and the client import these names
so the two can never disagree about a number. ``docs/protocol.md`` documents every value.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Tuple

# MAJOR changes break compatibility (client and server refuse each other); MINOR adds optional fields/methods.
PROTOCOL_VERSION = "1.1"

SESSION_HEADER = "X-CTReasoner-Session"
PROGRESS_NOTIFICATION = "progress"
NDJSON_CONTENT_TYPE = "application/x-ndjson"

# Methods that may run for a long time: the client gives them a job id so they can be cancelled.
JOB_METHODS = ("chat", "refine", "closer_look", "propagate", "set_image", "set_volume")


class ErrorCode(IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    MODEL_NOT_LOADED = -32001
    UNKNOWN_IMAGE = -32002
    PAYLOAD_TOO_LARGE = -32003
    MODEL_FAILURE = -32004
    CANCELLED = -32005
    VERSION_MISMATCH = -32006
    UNAUTHORIZED = -32007
    SESSION_LIMIT = -32008
    UNKNOWN_SESSION = -32009
    UNKNOWN_JOB = -32010


def parse_version(version: str) -> Tuple[int, int]:
    """``"1.2"`` -> (1, 2). Raises ValueError for anything else."""
    parts = str(version).strip().split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"protocol version {version!r} is not MAJOR.MINOR")
    return int(parts[0]), int(parts[1])


def versions_compatible(client_version: str, server_version: str) -> bool:
    """Same major version = compatible; minor versions only add optional things."""
    return parse_version(client_version)[0] == parse_version(server_version)[0]
