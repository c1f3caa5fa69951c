"""One conformance suite for every transport backend (local, scp, rsync, openssh).

The SSH backends talk to the loopback sshd fixture; since it runs on this machine, the "remote"
paths are temp dirs here too, so results can be checked directly on disk.
"""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from cax.checksum import scan_dataset
from cax.errors import ConfigError, TransferError
from cax.transport import local as local_backend
from cax.transport.base import Endpoint, Transport, open_transport
from tests.conftest import tiny_disk

pytestmark = pytest.mark.timeout(60)

METHODS = ["local", "scp", "rsync", "openssh", "stream", "auto", "stream-x4", "auto-x4"]
SSH_METHODS = ["scp", "rsync", "openssh", "stream", "auto"]
PARALLEL = "-x4"
"""A method name ending so: the method with ``streams`` 4, and the thresholds of lanes made
small enough that the small trees of these tests are spread over 4 streams and their larger
files cut into ranges (tests/conformance/test_parallel.py checks that they are)."""
# every character a shell would act on, and a command substitution spread over path components
EVIL = "we ird 'q\" ;&|<>*?[x]`id` $HOME $(touch {marker})"


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def parallel_endpoint(sshd, method: str, monkeypatch: pytest.MonkeyPatch, **fields) -> Endpoint:
    """``sshd``'s endpoint for ``method``; a PARALLEL one with 4 streams even for small data."""
    if method.endswith(PARALLEL):
        from cax.transport import lanes

        monkeypatch.setattr(lanes, "MIN_STREAM_BYTES", 1)
        monkeypatch.setattr(lanes, "MIN_RANGE", 64 << 10)
        return sshd.endpoint(method[:-len(PARALLEL)], streams=4, **fields)
    return sshd.endpoint(method, **fields)


@pytest.fixture
def endpoint(method: str, request: pytest.FixtureRequest,
             monkeypatch: pytest.MonkeyPatch) -> Endpoint:
    if method == "local":
        return Endpoint(site="testsite", method="local")
    return parallel_endpoint(request.getfixturevalue("sshd"), method, monkeypatch)


@pytest.fixture
def transport(endpoint: Endpoint):
    with open_transport(endpoint, stall_timeout_s=10) as t:
        yield t


def make_tree(root: Path, big_bytes: int = 300_000) -> Path:
    """Write a small nested dataset: empty file, sub-dirs, a file larger than one block."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty.dat").write_bytes(b"")
    (root / "a.dat").write_bytes(os.urandom(1000))
    (root / "sub" / "b c.dat").write_bytes(os.urandom(big_bytes))
    (root / "sub" / "deeper" / "d.dat").write_bytes(os.urandom(70_001))
    os.utime(root / "a.dat", (1_500_000_000, 1_500_000_000))
    return root


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def total_bytes(manifest: dict) -> int:
    return sum(size for size, _ in manifest.values())


# ------------------------------------------------------------------ copies


def test_transport_tree_put_get_roundtrip_identical(transport: Transport, tmp_path: Path):
    src = make_tree(tmp_path / "src")
    expected = scan_dataset(src)
    remote = str(tmp_path / "site" / "raw" / "run_001")  # parents do not exist yet
    seen: list[int] = []
    read = transport.put(src, remote, seen.append)
    assert same_tree(src, Path(remote))
    assert transport.manifest(remote) == expected
    assert read is None or read == expected
    assert abs(sum(seen) - total_bytes(expected)) <= 0.05 * total_bytes(expected)
    assert os.stat(Path(remote) / "a.dat").st_mtime == 1_500_000_000  # times preserved

    back = tmp_path / "back" / "run_001"
    transport.get(remote, back)
    assert same_tree(src, back)


def test_transport_single_file_put_get_roundtrip_identical(transport: Transport, tmp_path: Path):
    src = tmp_path / "proc.root"
    src.write_bytes(os.urandom(2_000_003))
    remote = str(tmp_path / "site" / "processed" / "proc.root")
    read = transport.put(src, remote)
    assert filecmp.cmp(src, remote, shallow=False)
    manifest = transport.manifest(remote)
    assert manifest == scan_dataset(src) and list(manifest) == ["."]
    assert read is None or read == manifest
    back = tmp_path / "back" / "proc.root"
    seen: list[int] = []
    transport.get(remote, back, seen.append)
    assert filecmp.cmp(src, back, shallow=False)
    assert abs(sum(seen) - 2_000_003) <= 100_000


def test_transport_put_over_partial_copy_yields_exact_copy(transport: Transport, tmp_path: Path):
    src = make_tree(tmp_path / "src", big_bytes=3_000_000)
    remote = tmp_path / "site" / "run"
    make_tree(remote, big_bytes=3_000_000)  # same shape, different content and times...
    for root, _dirs, files in os.walk(remote):
        for name in files:  # (rsync trusts equal size+mtime; verification catches the rest)
            os.utime(os.path.join(root, name), (1_400_000_000, 1_400_000_000))
    big = remote / "sub" / "b c.dat"
    big.write_bytes((src / "sub" / "b c.dat").read_bytes()[:1_000_000])  # ...a truncated file
    (remote / "a.dat").unlink()  # a missing file
    (remote / "stale.tmp").write_bytes(b"left over")  # an extra file
    transport.put(src, str(remote))
    assert same_tree(src, remote)
    assert transport.manifest(str(remote)) == scan_dataset(src)


def test_transport_put_file_over_directory_replaces_it(transport: Transport, tmp_path: Path):
    src = tmp_path / "f.dat"
    src.write_bytes(b"x" * 5000)
    remote = tmp_path / "site" / "f.dat"
    make_tree(remote)
    transport.put(src, str(remote))
    assert remote.is_file() and filecmp.cmp(src, remote, shallow=False)


def test_transport_get_over_partial_copy_yields_exact_copy(transport: Transport, tmp_path: Path):
    remote = make_tree(tmp_path / "site" / "run")
    local = tmp_path / "here" / "run"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "b c.dat").write_bytes(b"partial")
    transport.get(str(remote), local)
    assert same_tree(remote, local)


# ------------------------------------------------------------------ site operations


def test_transport_rename_moves_and_refuses_existing_target(transport: Transport, tmp_path: Path):
    make_tree(tmp_path / "tmp_run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_bytes(b"x")
    transport.rename(str(tmp_path / "tmp_run"), str(tmp_path / "run"))
    assert (tmp_path / "run" / "sub" / "b c.dat").is_file() and not (tmp_path / "tmp_run").exists()
    with pytest.raises(FileExistsError):
        transport.rename(str(tmp_path / "run"), str(tmp_path / "taken"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileExistsError):  # even an empty directory is not replaced
        transport.rename(str(tmp_path / "run"), str(tmp_path / "empty_dir"))
    with pytest.raises(FileNotFoundError):
        transport.rename(str(tmp_path / "nothing"), str(tmp_path / "else"))
    assert (tmp_path / "run").is_dir() and (tmp_path / "taken" / "x").is_file()


def test_transport_remove_and_exists(transport: Transport, tmp_path: Path):
    tree = make_tree(tmp_path / "run")
    single = tmp_path / "file.dat"
    single.write_bytes(b"1")
    assert transport.exists(str(tree)) and transport.exists(str(single))
    transport.remove(str(tree))
    transport.remove(str(single))
    transport.remove(str(tmp_path / "never" / "was"))  # missing is fine
    assert not tree.exists() and not single.exists()
    assert not transport.exists(str(tree))
    assert not transport.exists(str(single / "below_a_file"))


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_debug_log_names_what_each_site_script_does(transport: Transport, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture):
    """The site scripts travel on stdin, so the debug line says what each one is for."""
    import logging

    tree = make_tree(tmp_path / "run")
    with caplog.at_level(logging.DEBUG):
        transport.manifest(str(tree))
        transport.rename(str(tree), str(tmp_path / "moved"))
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"(checksums of {tree})" in line for line in lines), lines
    assert any(f"(rename {tree} {tmp_path / 'moved'})" in line for line in lines), lines
    assert not any("def " in line for line in lines)  # the scripts themselves are not shown


def test_transport_manifest_of_missing_path_raises_file_not_found(transport: Transport, tmp_path):
    with pytest.raises(FileNotFoundError):
        transport.manifest(str(tmp_path / "missing"))


def test_transport_hostile_names_copied_verbatim_without_shell(transport: Transport, tmp_path):
    marker = Path("/tmp") / f"cax-pwned-{uuid.uuid4().hex}"
    evil = EVIL.format(marker=marker)  # contains "/", so it spans several path components
    src = tmp_path / "src" / evil
    src.mkdir(parents=True)
    (src / "file ;$(id).dat").write_bytes(os.urandom(5000))
    (src / "-n").write_bytes(b"dash")
    remote = str(tmp_path / "site" / evil)
    try:
        transport.put(src, remote)
        assert same_tree(src, Path(remote))
        assert transport.exists(remote)
        assert transport.manifest(remote) == scan_dataset(src)
        transport.get(remote, tmp_path / "back" / evil)
        assert same_tree(src, tmp_path / "back" / evil)
        renamed = remote + " 'moved'"
        transport.rename(remote, renamed)
        transport.remove(renamed)
        assert not transport.exists(renamed) and not Path(renamed).exists()
        assert not marker.exists(), "a shell expanded $(...) in a path"
    finally:
        marker.unlink(missing_ok=True)


# ------------------------------------------------------------------ failures


def test_transport_missing_source_is_a_retryable_race(transport: Transport, tmp_path: Path):
    """Issue 7 item 6: a source that vanished was moved meanwhile; the attempts cap bounds it."""
    with pytest.raises(TransferError) as put_err:
        transport.put(tmp_path / "nope", str(tmp_path / "dst"))
    with pytest.raises(TransferError) as get_err:
        transport.get(str(tmp_path / "nope"), tmp_path / "dst")
    for err in (put_err.value, get_err.value):
        assert err.retryable and "nope" in str(err) and "testsite" in str(err)
        assert "No such file" in str(err)


def test_transport_destination_parent_is_file_not_retryable(transport: Transport, tmp_path):
    src = make_tree(tmp_path / "src")
    (tmp_path / "site").write_bytes(b"a file where a directory should be")
    with pytest.raises(TransferError) as err:
        transport.put(src, str(tmp_path / "site" / "raw" / "run"))
    assert not err.value.retryable
    assert "site" in str(err.value) and "testsite" in str(err.value)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB filesystem (tmpfs), for a destination that fills up."""
    with tiny_disk(tmp_path / "small", "1m") as mount:
        yield mount


@pytest.mark.parametrize("direction", ["put", "get"])
def test_transport_full_destination_disk_is_a_retryable_error(transport: Transport, tmp_path,
                                                              small_disk, direction):
    """A full disk fails the copy (no hang, a readable reason, retryable: space may be freed)
    and leaves the transport usable; many small files (the stream's writer pool) and one big."""
    src = tmp_path / "src"
    for i in range(30):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i:02d}.dat").write_bytes(os.urandom(100_000))
    (src / "big.dat").write_bytes(os.urandom(2_000_000))
    dst = small_disk / "run"
    with pytest.raises(TransferError) as err:
        if direction == "put":
            transport.put(src, str(dst))
        else:
            transport.get(str(src), dst)
    assert err.value.retryable
    assert re.search("No space left|the disk is full|not enough space", str(err.value)), err.value
    small = make_tree(tmp_path / "fits", big_bytes=10_000)
    transport.remove(str(dst)) if transport.exists(str(dst)) else None
    copied = transport.put(small, str(small_disk / "fits")) if direction == "put" else \
        transport.get(str(small), small_disk / "fits")
    assert same_tree(small, small_disk / "fits")
    assert copied is None or copied == scan_dataset(small)


def test_transport_destination_permission_denied_not_retryable(transport: Transport, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    # root ignores mode bits, but not the immutable attribute
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here")
    try:
        src = make_tree(tmp_path / "src")
        with pytest.raises(TransferError) as err:
            transport.put(src, str(locked / "raw" / "run"))
        assert not err.value.retryable
        with pytest.raises(TransferError) as err:
            transport.put(src, str(locked / "run"))
        assert not err.value.retryable
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_open_transport_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        open_transport(Endpoint(site="x", method="ftp"))
    assert "ftp" in str(err.value) and "rsync" in str(err.value) and "scp" in str(err.value)


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_unknown_host_key_refused_not_retryable(sshd, method: str, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ep = sshd.endpoint(method, known_hosts=str(empty))
    with open_transport(ep) as t, pytest.raises(TransferError) as err:
        t.exists(str(tmp_path))
    msg = str(err.value)
    assert not err.value.retryable
    assert f"127.0.0.1:{sshd.port}" in msg and str(empty) in msg and "accept_new_host_keys" in msg
    assert empty.read_text() == ""


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_changed_host_key_refused_not_retryable(sshd, method: str, tmp_path: Path):
    wrong = tmp_path / "known_hosts"
    other_key = Path(sshd.key_file + ".pub").read_text().split()[:2]  # a key, but not the host's
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other_key)}\n")
    with open_transport(sshd.endpoint(method, known_hosts=str(wrong))) as t:
        with pytest.raises(TransferError) as err:
            t.exists(str(tmp_path))
    assert not err.value.retryable and "host key" in str(err.value)


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_accept_new_host_key_opt_in_works_and_records_key(sshd, method, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ep = sshd.endpoint(method, known_hosts=str(empty), accept_new_host_keys=True)
    with open_transport(ep) as t:
        assert t.exists(str(tmp_path))
    assert empty.read_text().strip(), "the accepted key was not saved"
    with open_transport(sshd.endpoint(method, known_hosts=str(empty))) as t:
        assert t.exists(str(tmp_path))  # and it is trusted from now on


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_wrong_key_authentication_not_retryable(sshd, method: str, tmp_path: Path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with open_transport(sshd.endpoint(method, key_file=str(stranger))) as t:
        with pytest.raises(TransferError) as err:
            t.exists(str(tmp_path))
    assert not err.value.retryable and "authentication" in str(err.value)


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_server_down_retryable_then_recovers(sshd, method: str, tmp_path: Path):
    src = make_tree(tmp_path / "src")
    with open_transport(sshd.endpoint(method)) as t:
        assert t.exists(str(tmp_path))  # connected
        sshd.stop()
        try:
            with pytest.raises(TransferError) as err:
                t.exists(str(tmp_path))  # a network failure is never "absent"
            assert err.value.retryable and f"127.0.0.1:{sshd.port}" in str(err.value)
            with pytest.raises(TransferError) as err:
                t.put(src, str(tmp_path / "dst"))
            assert err.value.retryable
        finally:
            sshd.start()
        t.put(src, str(tmp_path / "dst"))  # the same transport reconnects
        assert same_tree(src, tmp_path / "dst")


def _when_copy_starts(directory: Path, action) -> threading.Thread:
    """Run ``action`` as soon as any file under ``directory`` has data (the copy is under way)."""

    def wait() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for root, _dirs, files in os.walk(directory):
                if any(os.path.getsize(os.path.join(root, f)) > 0 for f in files):
                    action()
                    return
            time.sleep(0.002)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _big_sparse_dataset(root: Path, nbytes: int) -> Path:
    root.mkdir(parents=True)
    with open(root / "big.dat", "wb") as f:  # sparse: reads as zeros, costs no disk
        f.truncate(nbytes)
    return root


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_server_killed_mid_transfer_retryable(sshd, method: str, tmp_path: Path):
    src = _big_sparse_dataset(tmp_path / "src", 256 * 2**20)
    dst = tmp_path / "dst"
    dst.mkdir()
    with open_transport(sshd.endpoint(method)) as t:
        watcher = _when_copy_starts(dst, sshd.stop)
        try:
            with pytest.raises(TransferError) as err:
                t.put(src, str(dst / "run"))
        finally:
            watcher.join()
            sshd.start()
    assert err.value.retryable, str(err.value)


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_stalled_transfer_aborted_retryable(sshd, method: str, tmp_path: Path):
    src = _big_sparse_dataset(tmp_path / "src", 256 * 2**20)
    dst = tmp_path / "dst"
    dst.mkdir()
    frozen: list[int] = []

    def freeze() -> None:
        frozen.extend(sshd.session_pids())
        for pid in frozen:
            os.kill(pid, 19)  # SIGSTOP: the peer is alive but moves no data

    with open_transport(sshd.endpoint(method), stall_timeout_s=1) as t:
        t.exists(str(dst))  # connect before the clock starts
        watcher = _when_copy_starts(dst, freeze)
        started = time.monotonic()
        try:
            with pytest.raises(TransferError) as err:
                t.put(src, str(dst / "run"))
            elapsed = time.monotonic() - started
        finally:
            watcher.join()
            for pid in frozen:
                try:
                    os.kill(pid, 18)  # SIGCONT
                except ProcessLookupError:
                    pass
    assert frozen, "the copy finished before it could be frozen"
    assert "stalled" in str(err.value) and err.value.retryable
    assert elapsed < 8


def test_local_slow_read_aborted_as_stalled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A read that blocks longer than the stall timeout (hung mount) aborts the local copy."""
    src = make_tree(tmp_path / "src", big_bytes=3_000_000)
    monkeypatch.setattr(local_backend, "BLOCK_BYTES", 2**20)
    real_open = open

    class SlowFile:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def readinto(self, buf):
            self.calls += 1
            if self.calls == 2:
                time.sleep(1.3)
            return self.f.readinto(buf)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def slow_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return SlowFile(f) if "r" in mode and isinstance(file, int) else f

    monkeypatch.setattr(local_backend, "open", slow_open, raising=False)
    with open_transport(Endpoint(site="testsite", method="local"), stall_timeout_s=1) as t:
        with pytest.raises(TransferError) as err:
            t.put(src, str(tmp_path / "dst"))
    assert "stalled" in str(err.value) and err.value.retryable


@pytest.mark.parametrize("method", SSH_METHODS)
def test_ssh_config_paths_with_spaces_and_percent_work(sshd, method: str, tmp_path: Path):
    odd = tmp_path / "keys dir %h"  # whitespace separates, % starts a token in ssh options
    odd.mkdir()
    key, known = odd / "id key", odd / "known hosts"
    key.write_bytes(Path(sshd.key_file).read_bytes())
    key.chmod(0o600)
    known.write_bytes(Path(sshd.known_hosts).read_bytes())
    with open_transport(sshd.endpoint(method, key_file=str(key), known_hosts=str(known))) as t:
        assert t.exists(str(tmp_path))


class _Abort(Exception):
    pass


def test_transport_progress_callback_exception_aborts_and_transport_recovers(
    transport: Transport, tmp_path: Path
):
    """The caller stops a copy from its progress callback (e.g. its lease was lost)."""
    src = _big_sparse_dataset(tmp_path / "src", 64 * 2**20)

    def abort(nbytes: int) -> None:
        raise _Abort

    started = time.monotonic()
    with pytest.raises(_Abort):
        transport.put(src, str(tmp_path / "dst"), abort)
    assert time.monotonic() - started < 10
    small = make_tree(tmp_path / "small")
    transport.put(small, str(tmp_path / "dst"))  # the same transport still works
    assert same_tree(small, tmp_path / "dst")


def _site_session(pid: int) -> bool:
    """Whether ``pid`` runs in an SSH session of a test sshd (its environment says so)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    ours = os.environ.get("SSH_CONNECTION", "").encode()  # CI itself may run over ssh
    return any(v.startswith(b"SSH_CONNECTION=") and v != b"SSH_CONNECTION=" + ours
               for v in environ)


def _descendants_outside_sshd(before: frozenset = frozenset()) -> list[str]:
    """Return the command lines of this process's descendants but the test sshd and its own,
    and those already there ``before`` (other fixtures' servers: munged, slurmd)."""
    from tests.sshd import SSHD_BIN, _children

    found, servers = {}, set()
    for pid in _children(os.getpid()):
        if pid in before:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline[0] == SSHD_BIN.encode() or cmdline[0].startswith(b"sshd: "):  # retitled
            servers.add(pid)
        if len(cmdline) < 2 or not cmdline[0]:
            continue  # exiting (a zombie's cmdline is empty)
        if _site_session(pid):
            continue  # the site's end (rsync --server, a site script), reparented when its
            # session closed: it stops when it sees the connection gone (checked below)
        found[pid] = b" ".join(cmdline).decode(errors="replace")
    for server in servers:
        for pid in [server, *_children(server)]:
            found.pop(pid, None)
    return list(found.values())


def _dest_size(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


@pytest.mark.parametrize("shape", ["one big file", "many small files"])
def test_transport_abort_from_another_thread_stops_copy(
    transport: Transport, tmp_path: Path, request: pytest.FixtureRequest, shape: str
):
    """The lease keeper's stopper: put raises, nothing of ours is left running or writing
    (many small files: the stream receiver's writer threads start no new file)."""
    src = tmp_path / "src"
    src.mkdir()
    if shape == "one big file":
        with open(src / "big.dat", "wb") as f:  # real blocks: the destination's disk use grows
            for _ in range(64):
                f.write(os.urandom(2**20))
    else:
        for i in range(400):
            (src / f"f{i:03d}.dat").write_bytes(os.urandom(100_000))
    dst = tmp_path / "dst"
    dst.mkdir()
    sshd = request.getfixturevalue("sshd") if transport.endpoint.method != "local" else None
    streams = transport.endpoint.streams or 1
    sizes: list[int] = []
    from tests.sshd import _children

    before = frozenset(_children(os.getpid()))

    def slow(nbytes: int) -> None:
        time.sleep(0.002)  # a slow link: the copy lasts long enough to be aborted

    def stop() -> None:
        transport.abort()
        sizes.append(_dest_size(dst))

    watcher = _when_copy_starts(dst, stop)
    with pytest.raises(TransferError) as err:
        transport.put(src, str(dst / "run"), slow)
    watcher.join()
    assert sizes, "the copy finished before it could be aborted"
    assert "aborted" in str(err.value) and err.value.retryable
    assert _descendants_outside_sshd(before) == []
    # at a remote destination the site's end may still write what was already on the site
    # (pipe buffers) in the moments before it sees the connection gone; then nothing more
    time.sleep(0.5)
    settled = _dest_size(dst)
    assert settled - sizes[0] <= (0 if sshd is None else streams * 2**21)
    time.sleep(1.0)
    assert _dest_size(dst) == settled, "the destination still grows after abort returned"
    with pytest.raises(TransferError):  # aborted until closed
        transport.put(src, str(dst / "run"))


def test_transport_link_tree_shares_inodes_not_directories(transport: Transport, tmp_path: Path):
    """How a new owner resumes from an earlier attempt's bytes without sharing its tree."""
    old = make_tree(tmp_path / "old")
    transport.link_tree(str(old), str(tmp_path / "new"))
    new = tmp_path / "new"
    assert same_tree(old, new)
    assert (new / "sub/b c.dat").stat().st_ino == (old / "sub/b c.dat").stat().st_ino
    (old / "sub/late.dat").write_bytes(b"a late write of the old owner")
    assert not (new / "sub/late.dat").exists()
