"""gzip on a streamed HTTP response (uni_sse, uni_http_stream): one compressor per stream, flushed after
every write so nothing is held back.

A stream is a long run of small, similar events (JSON pushes with the same keys, the same channel), so a
compressor kept across them is where the saving is: bench/delta.py measures a ticker quote's SSE event at
10 % of its bytes this way (303 B to 31 B), where a quote deflated alone (as permessage-deflate does
without context takeover) keeps 76 %. Each write of the transport (what was queued when the flusher came, one
event or a batch) is compressed and ended with `Z_SYNC_FLUSH`: the client's inflater can hand out
everything it got so far, so events and pings arrive when they are sent, not when the stream ends
(`curl --compressed`, a browser's EventSource and the npm `eventsource` all decode incrementally).

The compressor is the one state this keeps per stream, so its size is bounded by choice: a 4 KiB window
(12 bits; it still holds the ~15-25 last events, all the repetition a stream of pushes has) and memLevel
5: zlib's deflate takes `2^(wbits+2) + 2^(memLevel+9)` = 16 + 16 KiB plus ~6 KiB of state, ~38 KiB a
stream where zlib's defaults (15, 8) take ~262 KiB; bench/compression_memory.py measured +38.3 KiB per
stream with tracemalloc (docs/protocol.md#compression). It is freed when the stream ends (`Z_FINISH`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

# A stream's compressor (see the module docstring for why these).
GZIP_WINDOW_BITS = 12
GZIP_MEM_LEVEL = 5
GZIP_LEVEL = 6
GZIP_HEADERS = [(b"content-encoding", b"gzip"), (b"vary", b"accept-encoding")]


class GzipStream:
    """The gzip member of one response, written as it goes."""

    __slots__ = ("_compressor",)

    def __init__(self) -> None:
        # 16 + window bits: a gzip header and trailer around the deflate stream (RFC 1952).
        self._compressor: zlib._Compress | None = zlib.compressobj(
            GZIP_LEVEL, zlib.DEFLATED, 16 + GZIP_WINDOW_BITS, GZIP_MEM_LEVEL
        )

    def encode(self, chunk: bytes) -> bytes:
        """`chunk` compressed, with everything before it: the client can decode all of it now."""
        compressor = self._compressor
        if compressor is None:
            return b""  # past the end: nothing more belongs to this response
        return compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        """The member's end (the last block, CRC and length), once; the compressor's memory goes with it."""
        compressor, self._compressor = self._compressor, None
        return b"" if compressor is None else compressor.flush(zlib.Z_FINISH)


def accepts_gzip(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's `Accept-Encoding` takes gzip (RFC 9110 12.5.3: `gzip` or `*` with a q above 0,
    a named `gzip;q=0` refusing it whatever `*` says). No header: identity only, as before."""
    gzip: float | None = None
    star: float | None = None
    for name, value in headers:
        if name != b"accept-encoding":
            continue
        for item in value.decode("latin-1").split(","):
            coding, _, parameters = item.partition(";")
            coding = coding.strip().lower()
            if coding not in ("gzip", "x-gzip", "*"):
                continue
            q = 1.0
            for parameter in parameters.split(";"):
                key, _, number = parameter.partition("=")
                if key.strip().lower() == "q":
                    try:
                        q = float(number.strip())
                    except ValueError:
                        q = 0.0
            if coding == "*":
                star = q
            else:
                gzip = q if gzip is None else max(gzip, q)
    if gzip is not None:
        return gzip > 0
    return star is not None and star > 0
