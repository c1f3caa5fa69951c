"""A WAN emulator of our own: a TCP proxy on loopback that delays each direction by RTT/2 and
can cap the link's bandwidth.

cax's sites are continents apart (30-150 ms round trips); this machine has no netem (the kernel
lacks sch_netem) and no second host, so the tests and bench/wan.py put this proxy in front of
the loopback sshd (tests/sshd.py) and point cax at the proxy's port.  Every chunk read from one
side is held back for ``rtt/2`` before it is written to the other, in order; with ``rate`` the
link is a token bucket shared by all connections in one direction (what a real path's
bottleneck is), so N connections share the cap rather than getting N times it.

What it models: propagation delay, which is what limits one SSH stream (one OpenSSH channel
never has more than its 2 MB window in flight: at 100 ms about 20 MB/s however fast the link),
and a bottleneck's bandwidth.  What it does NOT model: packet loss and TCP's reaction to it
(slow start, congestion window, retransmits), TCP's own receive window over the long path (the
proxy acknowledges at once on loopback and buffers what is in flight), jitter, reordering, or
the time of TCP's handshake (connect() returns at once; a login's round trips are delayed as
every other byte).  On a real lossy WAN each TCP connection's window and loss recovery limit
all its channels, which is why cax spreads a copy over separate connections, not channels.

It runs as its own process (``python -m tests.wanproxy``), so its event loop does not compete
with the copy for the GIL of the process under test.  This is test code, not part of cax.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 256 << 10
BURST = 4 << 20
"""The token bucket's depth: a burst at line rate, as a real bottleneck's queue drains (40 ms
at 100 MB/s).  It must hold many chunks: with one chunk's depth, every late wake-up of the
event loop (a millisecond on a busy machine) lost the tokens of that millisecond, and a link
capped at 100 MB/s carried 70 MB/s of parallel ``ssh cat``."""
MAX_IN_FLIGHT = 256 << 20
"""Bytes held per connection and direction at most: beyond it the proxy stops reading (it
never does with SSH's windows, 2 MB per channel, but a bug must not eat the machine)."""


class TokenBucket:
    """A link of ``rate`` bytes/s shared by every connection in one direction (None: no cap)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.tokens = float(BURST)
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may enter the link (FIFO among waiters: the lock)."""
        if not self.rate:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(BURST, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= nbytes or self.tokens >= BURST:
                    self.tokens -= nbytes  # may go negative: a chunk larger than the burst
                    return
                await asyncio.sleep((min(nbytes, BURST) - self.tokens) / self.rate)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                link: TokenBucket) -> None:
    """Copy ``reader`` to ``writer``, each chunk released ``delay_s`` after it entered."""
    queue: collections.deque = collections.deque()
    ready = asyncio.Event()
    held = [0]
    room = asyncio.Event()
    room.set()

    async def release() -> None:
        while True:
            while not queue:
                ready.clear()
                await ready.wait()
            due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            held[0] -= len(data)
            if held[0] < MAX_IN_FLIGHT:
                room.set()

    releaser = asyncio.ensure_future(release())
    try:
        while True:
            data = await reader.read(CHUNK)
            if data:
                await link.take(len(data))
            queue.append((time.monotonic() + delay_s, data or None))
            ready.set()
            if not data:
                break
            held[0] += len(data)
            if held[0] >= MAX_IN_FLIGHT:
                room.clear()
                await room.wait()
        await releaser
    except (ConnectionError, OSError):
        pass
    finally:
        releaser.cancel()


async def _serve(listen_port: int, target_port: int, rtt_ms: float, rate: float | None,
                 ready_fd: int) -> None:
    delay_s = rtt_ms / 2000.0
    up, down = TokenBucket(rate), TokenBucket(rate)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pump(client_r, server_w, delay_s, up),
                                 _pump(server_r, client_w, delay_s, down))
        finally:
            for w in (client_w, server_w):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, limit=CHUNK)
    port = server.sockets[0].getsockname()[1]
    os.write(ready_fd, f"{port}\n".encode())
    os.close(ready_fd)
    async with server:
        await server.serve_forever()


class WanProxy:
    """The proxy as a child process: ``start()`` returns its port, ``stop()`` ends it.

    ``kill_connections()`` is not offered: to cut one connection, the tests kill the sshd
    session behind it (tests/sshd.py), as a real link failure looks to both ends.
    """

    def __init__(self, target_port: int, rtt_ms: float = 0.0, rate: float | None = None):
        self.target_port, self.rtt_ms, self.rate = target_port, rtt_ms, rate
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        read_fd, write_fd = os.pipe()
        root = str(Path(__file__).resolve().parents[1])
        argv = [sys.executable, "-m", "tests.wanproxy", "--target-port", str(self.target_port),
                "--rtt-ms", str(self.rtt_ms), "--ready-fd", str(write_fd)]
        if self.rate:
            argv += ["--rate", str(self.rate)]
        self.proc = subprocess.Popen(argv, cwd=root, pass_fds=(write_fd,),
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(write_fd)
        with os.fdopen(read_fd) as ready:
            line = ready.readline()
        if not line.strip():
            self.stop()
            raise RuntimeError("the WAN proxy did not start")
        self.port = int(line)
        return self.port

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> WanProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--rate", type=float, default=None, help="bytes/s per direction")
    parser.add_argument("--ready-fd", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush or close
    asyncio.run(_serve(args.listen_port, args.target_port, args.rtt_ms, args.rate,
                       args.ready_fd))


if __name__ == "__main__":
    main()
