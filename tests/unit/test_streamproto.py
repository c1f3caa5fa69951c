"""The stream receiver's writer threads, driven over plain pipes (no ssh): what they write once
the sender is gone, and when the disk fails."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from cax.checksum import scan_dataset
from cax.transport import streamproto


def _tree(root: Path, files: int = 30, size: int = 10_000) -> Path:
    for i in range(files):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i:02d}.dat").write_bytes(os.urandom(size))
    return root


class Pipes:
    """The two pipes of a stream: data to the receiver, replies back to the sender."""

    def __init__(self):
        data_r, data_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self.to_receiver = os.fdopen(data_w, "wb")
        self.receiver_in = os.fdopen(data_r, "rb")
        self.receiver_out = os.fdopen(reply_w, "wb")
        self.from_receiver = os.fdopen(reply_r, "rb")

    def close(self):
        for f in (self.to_receiver, self.receiver_in, self.receiver_out, self.from_receiver):
            try:
                f.close()
            except OSError:
                pass


def _receive_in_thread(dest: Path, pipes: Pipes) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            outcome.append(streamproto.receive(str(dest), pipes.receiver_in,
                                               pipes.receiver_out))
        except (OSError, streamproto.StreamError) as exc:
            outcome.append(exc)
            for f in (pipes.receiver_in, pipes.receiver_out):  # as the site's process exits
                try:
                    f.close()
                except OSError:  # a reply nobody reads any more
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_stream_over_pipes_writes_every_file_with_its_checksum(tmp_path):
    src = _tree(tmp_path / "src")
    pipes = Pipes()
    try:
        thread, outcome = _receive_in_thread(tmp_path / "dst", pipes)
        manifest = streamproto.send(str(src), pipes.from_receiver, pipes.to_receiver)
        thread.join(10)
    finally:
        pipes.close()
    expected = scan_dataset(src)
    assert scan_dataset(tmp_path / "dst") == expected
    assert {rel: tuple(v) for rel, v in manifest.items()} == expected
    assert {rel: tuple(v) for rel, v in outcome[0].items()} == expected


def test_no_new_file_is_started_once_the_sender_is_gone(tmp_path, monkeypatch):
    """The writers are held in their first files; the sender then goes away (an abort).  The
    files already being written may finish; no other file is created."""
    src = _tree(tmp_path / "src")
    hold, held = threading.Event(), []
    real_create = streamproto._create

    def slow_create(path):
        held.append(path)
        hold.wait(10)
        return real_create(path)

    monkeypatch.setattr(streamproto, "_create", slow_create)
    pipes = Pipes()
    dest = tmp_path / "dst"
    try:
        thread, outcome = _receive_in_thread(dest, pipes)
        listing = streamproto.list_tree(str(src).encode())
        streamproto.send_line(pipes.to_receiver, listing)
        assert streamproto.read_line(pipes.from_receiver) == {"have": {}, "partial": {}}
        for index, (rel, size, _mode, _mtime) in enumerate(listing["files"]):
            pipes.to_receiver.write(streamproto.HEADER.pack(index, -1, size))
            pipes.to_receiver.write((src / rel).read_bytes())
        pipes.to_receiver.flush()  # all 30 files are in the pipe or read by the receiver
        pipes.from_receiver.close()  # the sender is gone
        hold.set()
        pipes.to_receiver.close()
        thread.join(10)
    finally:
        pipes.close()
    assert isinstance(outcome[0], streamproto.StreamError)
    written = [p for p in dest.rglob("*.dat")]
    assert len(written) <= streamproto.WRITERS, written
    assert len(held) <= streamproto.WRITERS


def test_a_full_disk_fails_the_receive_and_stops_the_writers(tmp_path, monkeypatch):
    src = _tree(tmp_path / "src")
    calls = []
    real_create = streamproto._create

    def full_after_five(path):
        calls.append(path)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_create(path)

    monkeypatch.setattr(streamproto, "_create", full_after_five)
    pipes = Pipes()
    try:
        thread, outcome = _receive_in_thread(tmp_path / "dst", pipes)
        with pytest.raises((streamproto.StreamError, BrokenPipeError)):
            streamproto.send(str(src), pipes.from_receiver, pipes.to_receiver)
        thread.join(10)
    finally:
        pipes.close()
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.ENOSPC
    assert not thread.is_alive()
    assert len(calls) <= 5 + streamproto.WRITERS  # no file started after the failure


def test_listing_is_top_down_by_name_and_refuses_links_and_special_files(tmp_path):
    """Both ends index files by their position in the listing, and the receiver creates the
    directories in its order: parents first, every directory's entries by (byte) name."""
    root = tmp_path / "run"
    for rel in ("b/y", "a/z/w", "a/x", "B", "\udcff"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode("utf-8", "surrogateescape"))
    listing = streamproto.list_tree(str(root))
    assert [d[0] for d in listing["dirs"]] == [".", "a", "a/z", "b"]
    assert [f[0] for f in listing["files"]] == ["B", "\udcff", "a/x", "a/z/w", "b/y"]
    assert [f[1] for f in listing["files"]] == [1, 1, 3, 5, 3]
    assert listing == streamproto.list_tree(os.fsencode(root))
    for name, make in (("to-dir", lambda p: p.symlink_to(root / "a")),
                       ("to-file", lambda p: p.symlink_to(root / "B")),
                       ("fifo", lambda p: os.mkfifo(p))):
        odd = root / "a" / name
        make(odd)
        with pytest.raises(OSError) as caught:
            streamproto.list_tree(str(root))
        assert caught.value.errno == errno.EINVAL
        assert os.fsdecode(caught.value.filename) == str(odd)
        odd.unlink()


# ------------------------------------------------------------------ ranges and resume blocks


def test_adler32_combine_equals_the_checksum_of_the_concatenation():
    import random
    import zlib

    rng = random.Random(7)
    data = os.urandom(300_000)
    for _ in range(50):
        cut = rng.randrange(0, len(data) + 1)
        a, b = data[:cut], data[cut:]
        assert streamproto.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) \
            == zlib.adler32(data)
    zeros = bytes(200_000)  # sums that wrap the modulus
    assert streamproto.adler32_combine(zlib.adler32(zeros), zlib.adler32(data), len(data)) \
        == zlib.adler32(zeros + data)


def test_assemble_refuses_a_file_with_a_missing_or_doubled_range():
    import zlib

    data = os.urandom(1000)

    def piece(lo, hi):
        return [lo, hi - lo, f"{zlib.adler32(data[lo:hi]):08x}"]

    listing = {"files": [["f", 1000, 0o644, 0]], "dirs": [[".", 0o755, 0]], "kind": "dir"}
    manifest, rels = streamproto.assemble(listing, {}, {}, {}, {"f": [piece(400, 1000),
                                                                      piece(0, 400)]})
    assert manifest == {"f": [1000, f"{zlib.adler32(data):08x}"]} and rels == ["f"]
    for pieces in ([piece(0, 400)], [piece(0, 400), piece(300, 1000)],
                   [piece(0, 400), piece(400, 1000), piece(400, 1000)]):
        with pytest.raises(streamproto.StreamError):
            streamproto.assemble(listing, {}, {}, {}, {"f": pieces})
    with pytest.raises(streamproto.StreamError, match="left out"):
        streamproto.assemble(listing, {}, {}, {}, {})


def test_split_cuts_large_files_into_ranges_that_tile_them_and_share_evenly():
    from cax.transport import lanes

    block = streamproto.RESUME_BLOCK
    items = [[0, -1, 50 * block + 3, True], [1, -1, 1000, True], [2, -1, 9 * block, False],
             [3, 2 * block, 5 * block, True]]
    pieces = lanes.split(items, 8)
    for index, start, length in ((0, 0, 50 * block + 3), (3, 2 * block, 5 * block)):
        ranges = sorted((p[1], p[2]) for p in pieces if p[0] == index)
        assert len(ranges) > 1 and ranges[0][0] == start
        assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
        assert sum(n for _, n in ranges) == length
        assert all(lo % block == 0 for lo, _ in ranges)  # on resume blocks
    assert [2, -1, 9 * block, False] in pieces  # an existing file's inode is never ranged
    assert [1, -1, 1000, True] in pieces
    shares = lanes.assign(pieces, 8)
    loads = sorted(sum(p[2] for p in share) for share in shares)
    assert loads[-1] - loads[0] <= 9 * block  # the largest piece at most
    assert lanes.split(items, 1) == sorted(items, key=lambda p: -p[2])  # one stream: as is
