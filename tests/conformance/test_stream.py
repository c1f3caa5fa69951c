"""The ``stream`` method's own promises: resume sends only what is missing or wrong, the
returned manifest is the destination's, and ``auto`` picks by file count and mean size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cax.checksum import scan_dataset
from cax.transport.base import open_transport
from cax.transport.stream import STREAM_MAX_MEAN_BYTES, STREAM_MIN_FILES, streams

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


def test_auto_streams_many_small_files_only():
    assert streams({"kind": "dir", "files": STREAM_MIN_FILES, "size": STREAM_MIN_FILES * 100_000})
    assert not streams({"kind": "dir", "files": STREAM_MIN_FILES - 1, "size": 1})
    assert not streams({"kind": "dir", "files": 20, "size": 20 * (STREAM_MAX_MEAN_BYTES + 1)})
    assert not streams({"kind": "file", "files": 1, "size": 10})
