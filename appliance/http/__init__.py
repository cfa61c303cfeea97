"""Sans-IO HTTP/1.1 for the appliance: request bytes in, reply decisions out.

Theory of operation: `request` parses and validates request heads and
targets (raising `ProtocolError` with the status to answer); `conn`
holds the per-connection state machine (`HTTPConnection`) that frames
requests (pipelining, bodies to discard) and selects a prebuilt response
of the store for each (`Reply`). No sockets, no clock: the caller passes
bytes and the current date in.
"""
from .conn import HTTPConnection, Reply, reply_bytes
from .request import Limits, ProtocolError

__all__ = ["HTTPConnection", "Reply", "Limits", "ProtocolError", "reply_bytes"]
