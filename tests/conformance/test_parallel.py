"""Parallel streams (issue 21): a copy spread over separate SSH connections, large files cut
into ranges each verified, a stream that dies started again alone, resume across streams, and
the automatic number of streams (one on a LAN, several through an emulated long link).

tests/conformance/test_transport.py runs the whole transport suite with 4 streams too (methods
``stream-x4`` and ``auto-x4``); these are the promises only parallel copies make.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cax.checksum import scan_dataset
from cax.errors import TransferError
from cax.transport import lanes, streamproto
from cax.transport.base import open_transport
from tests.conformance.test_transport import same_tree
from tests.wanproxy import WanProxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams and ranges for data of a few MiB (the real thresholds are MiB-sized)."""
    monkeypatch.setattr(lanes, "MIN_STREAM_BYTES", 1)
    monkeypatch.setattr(lanes, "MIN_RANGE", 256 << 10)


def _dataset(root: Path, big: int = 3, big_bytes: int = 3_000_001, small: int = 20) -> Path:
    root.mkdir(parents=True)
    for i in range(big):
        (root / f"big{i}.dat").write_bytes(os.urandom(big_bytes))
    (root / "sub").mkdir()
    for i in range(small):
        (root / "sub" / f"s{i:02d}.dat").write_bytes(os.urandom(20_000))
    (root / "sub" / "empty.dat").write_bytes(b"")
    return root


def _logins(sshd) -> int:
    return Path(sshd.log).read_text(errors="replace").count("Accepted publickey")


def _spy_pieces(monkeypatch: pytest.MonkeyPatch) -> list[list]:
    seen: list[list] = []
    real = lanes.split

    def split(items, streams):
        pieces = real(items, streams)
        seen.extend(pieces)
        return pieces

    monkeypatch.setattr(lanes, "split", split)
    return seen


@pytest.mark.parametrize("method", ["stream", "auto"])
@pytest.mark.parametrize("direction", ["put", "get"])
def test_parallel_copy_uses_separate_connections_and_verified_ranges(
        sshd, tmp_path: Path, monkeypatch, small_thresholds, method, direction):
    """Fewer large files than streams: each is cut into ranges; the returned manifest (each
    file's adler32 combined from its ranges', computed where they were written) is the
    destination's; every stream has its own login (TCP connection)."""
    src = _dataset(tmp_path / "src", big=2)
    pieces = _spy_pieces(monkeypatch)
    dst = tmp_path / "dst"
    logins = _logins(sshd)
    with open_transport(sshd.endpoint(method, streams=4), stall_timeout_s=10) as t:
        got = t.put(src, str(dst)) if direction == "put" else t.get(str(src), dst)
        assert t.last_streams == 4
    assert got == scan_dataset(src) == scan_dataset(dst)
    assert same_tree(src, dst)
    assert os.stat(dst / "big0.dat").st_mtime_ns == os.stat(src / "big0.dat").st_mtime_ns
    ranged = {p[0] for p in pieces if p[1] >= 0}
    assert len(ranged) == 2, pieces  # both large files went in ranges
    assert _logins(sshd) - logins >= 4


def test_parallel_single_file_per_file_repair_is_cut_into_ranges(sshd, tmp_path: Path,
                                                                 monkeypatch, small_thresholds):
    """Per-file repair copies one file: with several streams it goes as ranges too."""
    src = tmp_path / "one.root"
    src.write_bytes(os.urandom(2_500_000))
    pieces = _spy_pieces(monkeypatch)
    with open_transport(sshd.endpoint("stream", streams=3), stall_timeout_s=10) as t:
        assert t.put(src, str(tmp_path / "there.root")) == scan_dataset(src)
        assert t.get(str(src), tmp_path / "back.root") == scan_dataset(src)
    assert (tmp_path / "back.root").read_bytes() == src.read_bytes()
    assert (tmp_path / "there.root").read_bytes() == src.read_bytes()
    assert sum(1 for p in pieces if p[1] >= 0) >= 6  # 3 ranges each way at least


class _Stop(Exception):
    pass


def _allocated(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("direction", ["put", "get"])
def test_parallel_copy_cut_off_resumes_with_only_the_rest(sshd, tmp_path: Path, monkeypatch,
                                                          direction):
    """A parallel copy stopped part-way (its lease lost) leaves range-written files without
    the source's mtime; the next attempt keeps their verified blocks and sends the rest."""
    block = streamproto.RESUME_BLOCK
    monkeypatch.setattr(lanes, "MIN_STREAM_BYTES", 1)
    monkeypatch.setattr(lanes, "MIN_RANGE", block)  # ranges of one block
    src = _dataset(tmp_path / "src", big=2, big_bytes=6 * block + 5, small=0)
    total = sum(size for size, _ in scan_dataset(src).values())
    dst = tmp_path / "dst"
    dst.mkdir()

    def stop_when_most_is_written(nbytes: int) -> None:
        time.sleep(0.002)
        if _allocated(dst) > 0.75 * total:
            raise _Stop

    with open_transport(sshd.endpoint("stream", streams=4), stall_timeout_s=10) as t:
        copy = (lambda p: t.put(src, str(dst / "run"), p)) if direction == "put" \
            else (lambda p: t.get(str(src), dst / "run", p))
        with pytest.raises(_Stop):
            copy(stop_when_most_is_written)
        sent: list[int] = []
        assert copy(sent.append) == scan_dataset(src) == scan_dataset(dst / "run")
    assert same_tree(src, dst / "run")
    # at most the 4 ranges under way when it stopped, and the partial tails, go again
    assert sum(sent) <= total - 0.75 * total + 4 * block + 2 * block, (sum(sent), total)


def _site_commands(sshd) -> list[int]:
    """The site ends (python) of the running streams."""
    found = []
    for pid in sshd.session_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"cax-site-script" in cmdline:
            found.append(pid)
    return found


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_stream_whose_connection_dies_is_started_again_alone(
        sshd, tmp_path: Path, small_thresholds, direction, caplog):
    """One stream's SSH connection is cut mid-copy: that stream starts again on a new
    connection with the pieces it had not finished; the others' connections are the same
    processes before and after, and the copy is verified."""
    src = _dataset(tmp_path / "src", big=4, big_bytes=4_000_000, small=0)
    total = sum(size for size, _ in scan_dataset(src).values())
    dst = tmp_path / "dst"
    killed: list[int] = []
    moved = [0]

    def slow(nbytes: int) -> None:
        moved[0] += nbytes
        time.sleep(0.01)  # a slow link: the copy lasts long enough to cut one connection
        if not killed and moved[0] > total // 5:
            commands = _site_commands(sshd)
            if len(commands) >= 4:
                session = _parent(commands[0])  # the connection's sshd (user@notty)
                os.kill(session, signal.SIGKILL)
                killed.append(session)

    with open_transport(sshd.endpoint("stream", streams=4), stall_timeout_s=10) as t, \
            caplog.at_level(logging.WARNING):
        t.exists(str(tmp_path))
        t._connections(4)  # noqa: SLF001 - log every stream in before, to compare after
        for conn in t._extra:  # noqa: SLF001
            conn._ensure_master()  # noqa: SLF001
        conns = [t, *t._extra]  # noqa: SLF001
        before = [c._master_proc.pid for c in conns]  # noqa: SLF001
        got = t.put(src, str(dst), slow) if direction == "put" else t.get(str(src), dst, slow)
        # the cut stream's connection is a new one, or none if the others took its pieces
        after = [c._master_proc and c._master_proc.pid for c in conns]  # noqa: SLF001
    assert killed, "the copy finished before a connection could be cut"
    assert got == scan_dataset(src) == scan_dataset(dst)
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1, (before, after)
    assert any("starting it again alone" in r.getMessage() for r in caplog.records)
    assert moved[0] < 1.75 * total  # only the cut stream's pieces went twice


def test_parallel_abort_stops_every_stream(sshd, tmp_path: Path, small_thresholds):
    """The lease keeper's abort: put raises 'aborted', and no stream's connection is left."""
    src = _dataset(tmp_path / "src", big=4, big_bytes=4_000_000, small=0)
    with open_transport(sshd.endpoint("stream", streams=4), stall_timeout_s=10) as t:
        aborter: list[threading.Thread] = []

        def slow(nbytes: int) -> None:
            time.sleep(0.01)
            if not aborter:
                aborter.append(threading.Thread(target=t.abort))
                aborter[0].start()

        with pytest.raises(TransferError) as err:
            t.put(src, str(tmp_path / "dst"), slow)
        aborter[0].join()
        assert "aborted" in str(err.value) and err.value.retryable
        for conn in [t, *t._extra]:  # noqa: SLF001
            assert conn._master_proc is None or conn._master_proc.poll() is not None  # noqa: SLF001
    assert _site_commands(sshd) == [] or _wait_gone(sshd)


def _wait_gone(sshd) -> bool:
    deadline = time.monotonic() + 5
    while _site_commands(sshd) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _site_commands(sshd)


# ------------------------------------------------------------------ how many streams


def test_automatic_streams_one_on_a_lan_more_over_a_long_round_trip():
    assert lanes.auto_streams(0.0002) == 1  # a LAN
    assert 2 < lanes.auto_streams(0.03) < lanes.MAX_STREAMS
    assert lanes.auto_streams(0.12) == lanes.MAX_STREAMS  # capped
    assert lanes.auto_streams(0.12, rate=100e6) < lanes.MAX_STREAMS  # a slower link
    assert lanes.streams_for_size(8, 3 * lanes.MIN_STREAM_BYTES) == 3
    assert lanes.streams_for_size(8, 100) == 1


def test_automatic_streams_follow_the_measured_round_trip(sshd, tmp_path: Path):
    """Straight to the loopback sshd one stream is chosen; through the WAN emulator at 40 ms
    several, and the copy is verified."""
    src = _dataset(tmp_path / "src", big=3, big_bytes=lanes.MIN_STREAM_BYTES, small=5)
    with open_transport(sshd.endpoint("auto"), stall_timeout_s=30) as t:
        assert t.put(src, str(tmp_path / "lan")) == scan_dataset(src)
        assert t.last_streams == 1 and t.round_trip_s() < 0.02
    with WanProxy(sshd.port, rtt_ms=40) as proxy:
        sshd.trust_port(proxy.port)
        with open_transport(sshd.endpoint("auto", port=proxy.port), stall_timeout_s=30) as t:
            assert t.put(src, str(tmp_path / "wan")) == scan_dataset(src)
            assert t.round_trip_s() >= 0.04
            assert t.last_streams == 3  # capped by the data: one per MIN_STREAM_BYTES
            assert t.get(str(tmp_path / "wan"), tmp_path / "back") == scan_dataset(src)
    assert same_tree(src, tmp_path / "back")


def test_configured_one_stream_never_measures_or_spreads(sshd, tmp_path: Path,
                                                         small_thresholds):
    src = _dataset(tmp_path / "src", big=2)
    with open_transport(sshd.endpoint("stream", streams=1), stall_timeout_s=10) as t:
        assert t.put(src, str(tmp_path / "dst")) == scan_dataset(src)
        assert t.last_streams == 1 and t._round_trip is None  # noqa: SLF001
