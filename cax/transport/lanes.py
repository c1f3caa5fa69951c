"""How many parallel streams a copy gets, and how its work is cut and shared among them.

One OpenSSH channel never has more than its window (2 MiB) in flight, so one stream moves at
most ``window / round trip``: 17 MB/s at 120 ms, whatever the link.  N streams, each over its
own SSH (and TCP) connection, move N times that, until the link or the CPU is the limit.  On a
LAN (round trip well under a millisecond) one stream is already CPU-bound, and more only add
logins and processes: the automatic choice gives one stream there, so parallel streams are
never slower than one on a LAN.

Pure functions on plain data; ``cax.transport.stream`` runs the streams.
"""

from __future__ import annotations

import heapq
import math

from cax.transport.streamproto import RESUME_BLOCK

SSH_WINDOW = 2 << 20
"""OpenSSH's channel window (CHAN_SES_WINDOW_DEFAULT): the bytes one stream has in flight."""
PEAK_RATE = 500e6
"""Bytes/s one stream reaches when the round trip does not limit it (cax-stream on this
machine's loopback, bench/transfer.py); a transport raises it when a copy went faster."""
MAX_STREAMS = 16
"""The automatic choice's cap: logins, processes and the site's sshd's MaxSessions/MaxStartups
(10 by default for unauthenticated connections at once) bound it."""
MIN_STREAM_BYTES = 8 << 20
"""A stream must have at least this much to move, or it costs more (a command, a login's
round trips) than it gives."""
PIECES_PER_STREAM = 4
"""Large files are cut into ranges so that every stream gets about this many pieces: the
streams then finish together, whatever the mix of sizes."""
MIN_RANGE = 8 << 20
"""No range smaller than this (each is a header, an open and its own adler32)."""


def auto_streams(round_trip_s: float, rate: float = PEAK_RATE) -> int:
    """Return the number of streams that fill a link of ``rate`` bytes/s at ``round_trip_s``:
    the bandwidth-delay product over one stream's window, between 1 and MAX_STREAMS."""
    wanted = math.ceil(round_trip_s * rate / SSH_WINDOW - 0.5)
    return max(1, min(MAX_STREAMS, wanted))


def streams_for_size(wanted: int, nbytes: int) -> int:
    """Return at most ``wanted`` streams, one per MIN_STREAM_BYTES of ``nbytes``."""
    return max(1, min(wanted, nbytes // MIN_STREAM_BYTES))


def split(items: list[list], streams: int) -> list[list]:
    """Cut the splittable items ([index, offset, length, splittable]; offset -1: the whole
    file) into ranges of at most a chunk so that each of ``streams`` gets several pieces;
    return all pieces, largest first (the order in which streams take them).

    Items start on a resume block (whole files, and the spans ``streamproto.plan`` sends of a
    half-copied one), and large chunks are whole blocks, so every range starts on one."""
    total = sum(item[2] for item in items)
    chunk = max(MIN_RANGE, math.ceil(total / max(1, streams * PIECES_PER_STREAM)))
    if chunk >= RESUME_BLOCK:  # whole blocks: a copy cut off keeps every range it finished
        chunk = math.ceil(chunk / RESUME_BLOCK) * RESUME_BLOCK
    pieces = []
    for index, offset, length, splittable in items:
        if streams < 2 or not splittable or length <= chunk:
            pieces.append([index, offset, length, splittable])
            continue
        start, end = max(offset, 0), max(offset, 0) + length
        for lo in range(start, end, chunk):
            pieces.append([index, lo, min(chunk, end - lo), True])
    pieces.sort(key=lambda p: -p[2])
    return pieces


def assign(pieces: list[list], streams: int) -> list[list[list]]:
    """Share ``pieces`` among ``streams`` by bytes, largest first to the least loaded
    (for streams whose work must be known when they start: the site sends)."""
    shares: list[list[list]] = [[] for _ in range(streams)]
    heap = [(0, k) for k in range(streams)]
    for piece in sorted(pieces, key=lambda p: -p[2]):
        load, k = heapq.heappop(heap)
        shares[k].append(piece)
        heapq.heappush(heap, (load + piece[2] + 1, k))
    return shares
