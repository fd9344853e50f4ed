"""Client library for the CTReasoner backend (standard library + numpy only; Slicer imports it).

See ``client.py`` for usage and ``docs/protocol.md`` for the wire protocol.
"""
from .client import (BackgroundCall, CallCancelledError, CallTimeoutError, CTReasonerClient, PropagationReply,
                     RefineReply, ServerConnectionError, ServerError, SliceReply, VersionMismatchError)
from .encoding import PayloadError, decode_array, decode_mask, encode_array, encode_mask
from .geometry import SliceGeometry
from .spec import PROTOCOL_VERSION, ErrorCode

__all__ = [
    "BackgroundCall", "CallCancelledError", "CallTimeoutError", "CTReasonerClient", "PropagationReply",
    "RefineReply", "ServerConnectionError", "ServerError", "SliceReply", "VersionMismatchError",
    "PayloadError", "decode_array", "decode_mask", "encode_array", "encode_mask", "SliceGeometry",
    "PROTOCOL_VERSION", "ErrorCode",
]
