"""The ``stream`` method's own promises: resume sends only what is missing or wrong (of a large
half-copied file only what is not verified yet), and the returned manifest is the
destination's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cax.checksum import scan_dataset
from cax.transport import streamproto
from cax.transport.base import open_transport

pytestmark = pytest.mark.timeout(60)


def _tree(root: Path, files: int = 30, size: int = 20_000) -> Path:
    for i in range(files):
        path = root / f"d{i % 3}" / f"f{i:03d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return root


@pytest.mark.parametrize("direction", ["put", "get"])
def test_stream_resume_sends_only_incomplete_or_wrong_files(sshd, tmp_path: Path, direction):
    src = _tree(tmp_path / "src")
    dst = tmp_path / "dst"
    with open_transport(sshd.endpoint("stream"), stall_timeout_s=10) as t:
        copy = (lambda: t.put(src, str(dst), sent.append)) if direction == "put" \
            else (lambda: t.get(str(src), dst, sent.append))
        sent: list[int] = []
        first = copy()
        assert first == scan_dataset(dst) == scan_dataset(src)
        # an interrupted earlier attempt: a missing file, a same-size-and-mtime file with
        # other bytes, the file that was being written (its first bytes), an extra file
        (dst / "d0" / "f000.dat").unlink()
        wrong = dst / "d1" / "f001.dat"
        info = wrong.stat()
        wrong.write_bytes(os.urandom(20_000))
        os.utime(wrong, ns=(info.st_atime_ns, info.st_mtime_ns))
        cut = dst / "d2" / "f002.dat"
        cut.write_bytes(cut.read_bytes()[:10_000])
        (dst / "extra.dat").write_bytes(b"not in the source")
        sent.clear()
        second = copy()
    assert sum(sent) == 60_000  # the missing, the wrong and the cut file, nothing else
    assert second == scan_dataset(dst) == scan_dataset(src)
    assert not (dst / "extra.dat").exists()


@pytest.mark.parametrize("method", ["stream", "auto"])
@pytest.mark.parametrize("direction", ["put", "get"])
def test_half_copied_large_file_resumes_from_its_verified_blocks(sshd, tmp_path: Path,
                                                                 direction, method):
    """Issue 19: a large file cut off mid-copy is not sent again whole; of its prefix only the
    blocks whose hash differs from the source's are (so ``auto`` keeps streaming large files
    instead of handing them to rsync for its delta resume)."""
    block = streamproto.RESUME_BLOCK
    src = tmp_path / "src.root"
    src.write_bytes(os.urandom(3 * block + 12345))
    dst = tmp_path / "dst.root"
    with open_transport(sshd.endpoint(method, streams=1), stall_timeout_s=10) as t:
        sent: list[int] = []
        copy = (lambda: t.put(src, str(dst), sent.append)) if direction == "put" \
            else (lambda: t.get(str(src), dst, sent.append))
        dst.write_bytes(src.read_bytes()[:2 * block + 999])  # cut off, no mtime of the source
        assert copy() == scan_dataset(src)
        assert sum(sent) == src.stat().st_size - 2 * block  # the two whole blocks stayed
        assert dst.read_bytes() == src.read_bytes()
        # a half-copied file with a wrong byte in its first block: that block goes again
        data = bytearray(src.read_bytes()[:3 * block])
        data[5] ^= 0xFF
        dst.write_bytes(bytes(data))
        sent.clear()
        assert copy() == scan_dataset(src) == scan_dataset(dst)
        assert sum(sent) == src.stat().st_size - 2 * block


def test_resume_never_writes_into_an_inode_another_tree_shares(sshd, tmp_path: Path):
    """A new owner resumes from the old attempt's tree through hard links (link_tree): the
    half-copied file it completes in place must become its own first."""
    block = streamproto.RESUME_BLOCK
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.dat").write_bytes(os.urandom(2 * block + 100))
    old = tmp_path / "old"
    old.mkdir()
    (old / "big.dat").write_bytes((src / "big.dat").read_bytes()[:block + 7])
    before = (old / "big.dat").read_bytes()
    with open_transport(sshd.endpoint("stream", streams=1), stall_timeout_s=10) as t:
        t.link_tree(str(old), str(tmp_path / "new"))
        assert t.put(src, str(tmp_path / "new")) == scan_dataset(src)
    assert (old / "big.dat").read_bytes() == before
    assert scan_dataset(tmp_path / "new") == scan_dataset(src)
