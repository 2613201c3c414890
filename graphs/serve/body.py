"""Request bodies: read within a size and a time limit, under a bound on the bytes being read at once, decoded.

Every problem raises ``ProtocolError`` with the status to answer: 413 past the size limit (after reading on, up
to ``DRAIN_FACTOR`` times the limit, so that a client still sending receives the answer instead of a reset),
408 when the body has not arrived in time, 503 with ``Retry-After`` when the bytes in flight would pass their
bound, 415 for a content encoding other than gzip, deflate or identity. A client that goes away mid-body raises
``ClientGone``.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable

from graphs.serve.protocol import ProtocolError

DRAIN_FACTOR = 4
# zlib window bits: 16 + 15 reads the gzip wrapper, 15 the zlib wrapper that HTTP's "deflate" names.
ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
RETRY_AFTER_S = 1


class ClientGone(Exception):
    """The client disconnected before its request was answered."""


class BodyBudget:
    """Bytes of bodies being read, decoded or parsed at once. With nothing in flight any one body is admitted, so
    a body of the size limit always gets in; otherwise a body that would pass ``limit`` is refused."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, size: int) -> None:
        if self.used and self.used + size > self.limit:
            raise ProtocolError(
                503,
                f"the server is reading {self.used} bytes of request bodies (bound {self.limit}); retry later",
                "BODY_BUDGET",
            )
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


Receive = Callable[[], Awaitable[dict]]


async def receive_body(
    receive: Receive, declared: int | None, limit: int, budget: BodyBudget, first: dict | None = None
) -> tuple[bytes | bytearray, int]:
    """The raw body and the bytes taken from ``budget`` for it (the caller gives them back once it is parsed);
    ``first``: the first message, where the caller has received it already.

    A body of declared length is written chunk by chunk into one buffer, so that no copy of the whole body
    holds the event loop at its end (nor doubles its memory)."""
    too_long = ProtocolError(
        413,
        f"request body of {declared if declared is not None else 'more than ' + str(limit)} bytes exceeds the "
        f"limit of {limit} bytes",
    )
    if declared is not None and declared > DRAIN_FACTOR * limit:
        raise too_long
    taken = 0
    if declared is not None and declared <= limit:
        budget.take(declared)
        taken = declared
    buffer = bytearray(declared) if declared is not None and declared <= limit else None
    try:
        chunks, size, more = [], 0, True
        while more:
            message, first = (first, None) if first is not None else (await receive(), None)
            if message["type"] == "http.disconnect":
                raise ClientGone("the client disconnected while sending its request")
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > DRAIN_FACTOR * limit:
                raise too_long
            if size <= limit:
                if size > taken:
                    budget.take(size - taken)
                    taken = size
                if buffer is not None and size <= len(buffer):
                    buffer[size - len(chunk) : size] = chunk
                else:
                    chunks.append(chunk)
        if size > limit:
            raise too_long
        if buffer is not None and (size != len(buffer) or chunks):
            raise ProtocolError(400, f"the body holds {size} bytes, its Content-Length says {declared}")
    except BaseException:
        budget.give(taken)
        raise
    if buffer is not None:
        return buffer, taken
    return chunks[0] if len(chunks) == 1 else b"".join(chunks), taken


def content_encoding(header: str | None) -> int | None:
    """zlib's window bits for the request's ``Content-Encoding`` (None for identity); 415 for any other."""
    name = (header or "identity").strip().lower()
    if name == "identity":
        return None
    if name not in ENCODINGS:
        raise ProtocolError(
            415,
            f"Content-Encoding {header!r} is not supported: allowed gzip, deflate or identity",
            "UNSUPPORTED_ENCODING",
        )
    return ENCODINGS[name]


def decompress(body: bytes, wbits: int, limit: int) -> bytes:
    """``body`` decoded, refused with 413 as soon as the decoded size passes ``limit``."""
    decoder = zlib.decompressobj(wbits)
    try:
        decoded = decoder.decompress(body, limit + 1)
    except zlib.error as error:
        raise ProtocolError(400, f"the request body is not valid for its Content-Encoding: {error}") from None
    if len(decoded) > limit:
        raise ProtocolError(413, f"the decoded request body exceeds the limit of {limit} bytes")
    if not decoder.eof or decoder.unused_data:
        raise ProtocolError(400, "the compressed request body is truncated or followed by other data")
    return decoded
