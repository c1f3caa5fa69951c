"""Tests for cax.checksum: each value is checked against an independent zlib/hashlib computation."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cax import checksum
from cax.proc import run

SHA512_OF_NOTHING = (
    "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
    "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
)


# ---- independent reference implementations -------------------------------------------------------


def seeded(seed: int) -> random.Random:
    """Reproducible test data (not for cryptography)."""
    return random.Random(seed)  # noqa: S311


def naive_adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def naive_manifest(root: Path) -> dict[str, tuple[int, str]]:
    """Whole-file reads over os.walk: shares no code with cax.checksum."""
    if root.is_file():
        data = root.read_bytes()
        return {".": (len(data), naive_adler(data))}
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath, name)
            data = full.read_bytes()
            out[full.relative_to(root).as_posix()] = (len(data), naive_adler(data))
    return out


def naive_dataset_checksum(manifest: dict[str, tuple[int, str]]) -> str:
    listing = "".join(
        f"{rel}\t{size}\t{adler}\n" for rel, (size, adler) in sorted(manifest.items())
    )
    return "adler32:" + hashlib.sha256(listing.encode("utf-8")).hexdigest()


def naive_dirhash(root: Path) -> str:
    """checksumdir.dirhash(root, "sha512") as the original cax called it."""
    hexes = []
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        hexes.extend(hashlib.sha512(Path(dirpath, n).read_bytes()).hexdigest() for n in filenames)
    outer = hashlib.sha512()
    for value in sorted(hexes):
        outer.update(value.encode("utf-8"))
    return outer.hexdigest()


def make_tree(root: Path, files: dict[str, bytes], empty_dirs: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel in empty_dirs:
        (root / rel).mkdir(parents=True)
    return root


def run_remote_script(path: str | Path, cwd: Path | None = None) -> str:
    """Run REMOTE_MANIFEST_SCRIPT locally as ssh would run it remotely; return its stdout."""
    request = json.dumps({"path": os.fsdecode(path)}) + "\n"
    argv = [sys.executable, "-c", checksum.REMOTE_MANIFEST_SCRIPT]
    result = run(argv, input=request, timeout=60, check=False, cwd=str(cwd) if cwd else None)
    assert result.returncode in (0, 1), result.stderr
    reply = json.loads(result.stdout)
    assert result.returncode == (1 if "error" in reply else 0)
    return result.stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    rng = seeded(7)
    files = {
        "a.bin": rng.randbytes(1000),
        "empty.bin": b"",
        "sub/b.bin": rng.randbytes(70_000),
        "sub/deeper/c.bin": rng.randbytes(5),
        "sub/deeper/empty2.bin": b"",
        "zé ñ.bin": b"unicode name",
    }
    return make_tree(tmp_path / "run_001", files, empty_dirs=("void", "sub/void/void"))


# ---- adler32_file --------------------------------------------------------------------------------


def test_adler32_file_empty_file_returns_zlib_start_value(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    assert checksum.adler32_file(tmp_path / "e") == "00000001" == naive_adler(b"")


@pytest.mark.parametrize("size", [1, 5555, checksum.CHUNK_BYTES, 3 * checksum.CHUNK_BYTES + 12345])
def test_adler32_file_sizes_across_block_boundaries_match_zlib(tmp_path: Path, size: int) -> None:
    data = seeded(size).randbytes(size)
    (tmp_path / "f").write_bytes(data)
    assert checksum.adler32_file(str(tmp_path / "f")) == naive_adler(data)


def test_adler32_file_fifo_raises_value_error_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a regular file"):
        checksum.adler32_file(tmp_path / "fifo")


def test_adler32_file_read_error_raises_oserror() -> None:
    # /proc/self/mem is a regular file whose first page is unmapped: read() fails with EIO.
    with pytest.raises(OSError):
        checksum.adler32_file("/proc/self/mem")


def test_adler32_file_missing_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        checksum.adler32_file(tmp_path / "nope")


# ---- scan_dataset --------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_scan_dataset_nested_tree_matches_naive_walk(tree: Path, threads: int) -> None:
    manifest = checksum.scan_dataset(tree, threads=threads)
    assert manifest == naive_manifest(tree)
    assert "sub/deeper/c.bin" in manifest
    assert not any(rel.startswith("void") for rel in manifest)


def test_scan_dataset_empty_directories_only_returns_empty_manifest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {}, empty_dirs=("x/y", "z"))
    assert checksum.scan_dataset(root) == {}
    assert checksum.dataset_checksum({}) == "adler32:" + hashlib.sha256(b"").hexdigest()


def test_scan_dataset_zero_byte_files_lists_each_with_size_zero(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"a": b"", "s/b": b""})
    assert checksum.scan_dataset(root) == {"a": (0, "00000001"), "s/b": (0, "00000001")}


def test_scan_dataset_single_file_uses_dot_key(tmp_path: Path) -> None:
    data = seeded(1).randbytes(3 * 2**20 + 7)
    (tmp_path / "run.root").write_bytes(data)
    manifest = checksum.scan_dataset(tmp_path / "run.root")
    assert (
        manifest == {".": (len(data), naive_adler(data))} == naive_manifest(tmp_path / "run.root")
    )


def test_scan_dataset_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        checksum.scan_dataset(tmp_path / "nope")


def test_scan_dataset_symlinked_root_is_followed(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tree)
    assert checksum.scan_dataset(tmp_path / "link") == naive_manifest(tree)


@pytest.mark.parametrize("target", ["a.bin", "sub", "/etc/hostname"])
def test_scan_dataset_symlink_inside_raises_value_error_naming_it(tree: Path, target: str) -> None:
    (tree / "sub/deeper/link").symlink_to(target)
    with pytest.raises(ValueError, match="sub/deeper/link"):
        checksum.scan_dataset(tree)


def test_scan_dataset_fifo_inside_raises_value_error_naming_it(tree: Path) -> None:
    (tree / "sub/b.bin").unlink()
    os.mkfifo(tree / "sub/b.bin")  # a file replaced by a FIFO: reading it would block forever
    with pytest.raises(ValueError, match=r"sub/b\.bin"):
        checksum.scan_dataset(tree)


def test_scan_dataset_fifo_as_root_raises_value_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="neither a regular file nor a directory"):
        checksum.scan_dataset(tmp_path / "fifo")


@pytest.mark.parametrize("threads", [1, 2])
def test_scan_dataset_read_error_in_one_file_raises_oserror(
    tree: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = checksum._adler32_path

    def failing(path: bytes, nofollow: bool) -> tuple:
        if path.endswith(b"c.bin"):
            raise OSError(5, "Input/output error", os.fsdecode(path))
        return real(path, nofollow)

    monkeypatch.setattr(checksum, "_adler32_path", failing)
    with pytest.raises(OSError, match=r"c\.bin"):
        checksum.scan_dataset(tree, threads=threads)


def test_scan_dataset_zero_threads_raises_value_error(tree: Path) -> None:
    with pytest.raises(ValueError, match="threads"):
        checksum.scan_dataset(tree, threads=0)


def test_scan_dataset_undecodable_name_keeps_raw_bytes(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    with open(os.fsencode(root) + b"/caf\xe9", "wb") as f:  # not valid UTF-8
        f.write(b"latin-1 name")
    manifest = checksum.scan_dataset(root)
    assert manifest == {"caf\udce9": (12, naive_adler(b"latin-1 name"))}
    listing = b"caf\xe9\t12\t" + naive_adler(b"latin-1 name").encode() + b"\n"
    assert checksum.dataset_checksum(manifest) == "adler32:" + hashlib.sha256(listing).hexdigest()
    assert checksum.parse_remote_manifest(run_remote_script(root)) == manifest


names = st.text(alphabet="ab é$'", min_size=1, max_size=4)
trees = st.dictionaries(
    st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(max_size=300)
)


def without_prefix_clashes(files: dict[str, bytes]) -> dict[str, bytes]:
    """Drop paths that would need to be both a file and a directory."""
    return {p: d for p, d in files.items() if not any(q.startswith(p + "/") for q in files)}


@settings(max_examples=60, deadline=None)
@given(files=trees.map(without_prefix_clashes), empty=st.lists(names, max_size=3), data=st.data())
def test_scan_dataset_random_tree_matches_naive_and_ignores_creation_order(
    files: dict[str, bytes], empty: list[str], data: st.DataObject
) -> None:
    empty_dirs = tuple(dict.fromkeys("_" + name for name in empty))  # "_" never starts a file
    shuffled = dict(data.draw(st.permutations(list(files.items()))))
    with tempfile.TemporaryDirectory() as tmp:
        first = make_tree(Path(tmp, "one"), files, empty_dirs)
        second = make_tree(Path(tmp, "two"), shuffled, empty_dirs[::-1])
        manifest = checksum.scan_dataset(first)
        assert manifest == naive_manifest(first)
        assert checksum.scan_dataset(second) == manifest
    assert checksum.dataset_checksum(manifest) == naive_dataset_checksum(manifest)
    assert checksum.dataset_checksum(dict(reversed(manifest.items()))) == naive_dataset_checksum(
        manifest
    )


# ---- dataset_checksum and diff_manifests --------------------------------------------------------


def test_dataset_checksum_known_manifest_matches_stored_format() -> None:
    manifest = {
        "zé.bin": (5, naive_adler(b"hello")),
        "sub/abc.bin": (3, naive_adler(b"abc")),
        "empty.bin": (0, "00000001"),
    }
    # Frozen: this value is stored in the runs DB forever.
    expected = "adler32:c01013126edcaab93aa9d92b48d9c9675032e79d0524573ee88534f36ad71298"
    assert checksum.dataset_checksum(manifest) == expected == naive_dataset_checksum(manifest)


def test_dataset_checksum_renamed_directory_unchanged(tree: Path) -> None:
    before = checksum.dataset_checksum(checksum.scan_dataset(tree))
    renamed = tree.rename(tree.with_name("run_001.renamed"))
    assert checksum.dataset_checksum(checksum.scan_dataset(renamed)) == before


def test_dataset_checksum_renamed_single_file_unchanged(tmp_path: Path) -> None:
    (tmp_path / "a.root").write_bytes(b"processed")
    before = checksum.dataset_checksum(checksum.scan_dataset(tmp_path / "a.root"))
    (tmp_path / "a.root").rename(tmp_path / "b.root")
    assert checksum.dataset_checksum(checksum.scan_dataset(tmp_path / "b.root")) == before


def swap_contents(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def test_dataset_checksum_swapped_file_contents_changes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"x.bin": b"first", "y.bin": b"other"})
    before = checksum.dataset_checksum(checksum.scan_dataset(root))
    swap_contents(root / "x.bin", root / "y.bin")
    assert checksum.dataset_checksum(checksum.scan_dataset(root)) != before


def test_legacy_dirhash_swapped_file_contents_unchanged(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"x.bin": b"first", "y.bin": b"other"})
    before = checksum.legacy_dirhash(root)
    swap_contents(root / "x.bin", root / "y.bin")
    assert checksum.legacy_dirhash(root) == before  # the weakness the adler32 format fixes


@pytest.mark.parametrize("name", ["tab\there", "new\nline"])
def test_dataset_checksum_ambiguous_name_raises_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="tab or newline"):
        checksum.dataset_checksum({name: (1, "00020002")})


@pytest.mark.parametrize(
    "entry", [(-1, "00000001"), (1, "0000001"), (1, "ABCDEF01"), (True, "00000001")]
)
def test_dataset_checksum_malformed_entry_raises_value_error(entry: tuple) -> None:
    with pytest.raises(ValueError, match="malformed"):
        checksum.dataset_checksum({"f": entry})


def test_diff_manifests_flipped_byte_in_100_files_names_only_that_file(tmp_path: Path) -> None:
    rng = seeded(100)
    files = {f"sub{i % 4}/f{i:03d}.bin": rng.randbytes(rng.randrange(1, 5000)) for i in range(100)}
    root = make_tree(tmp_path / "d", files)
    expected = checksum.scan_dataset(root)
    victim = root / "sub1/f057.bin"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(data)
    actual = checksum.scan_dataset(root)
    assert checksum.diff_manifests(expected, actual) == ["sub1/f057.bin"]
    assert checksum.dataset_checksum(actual) != checksum.dataset_checksum(expected)


def test_diff_manifests_missing_extra_and_resized_returns_sorted_names() -> None:
    expected = {"a": (1, "00020002"), "b": (2, "00030003"), "c": (3, "00040004")}
    actual = {"a": (1, "00020002"), "b": (5, "00030003"), "d": (3, "00040004")}
    assert checksum.diff_manifests(expected, actual) == ["b", "c", "d"]
    assert checksum.diff_manifests(expected, dict(expected)) == []


# ---- legacy dirhash ------------------------------------------------------------------------------


def test_legacy_dirhash_empty_directory_is_sha512_of_nothing(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {}, empty_dirs=("x/y",))
    assert checksum.legacy_dirhash(root) == SHA512_OF_NOTHING == hashlib.sha512(b"").hexdigest()


def test_legacy_dirhash_nested_tree_matches_checksumdir_algorithm(tree: Path) -> None:
    assert checksum.legacy_dirhash(tree) == naive_dirhash(tree)


def test_legacy_dirhash_zero_byte_dataset_matches_checksumdir_algorithm(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", {"a": b"", "s/b": b""})
    assert checksum.legacy_dirhash(root) == naive_dirhash(root)


def test_legacy_dirhash_single_file_is_plain_sha512(tmp_path: Path) -> None:
    data = seeded(2).randbytes(2 * checksum.CHUNK_BYTES + 1)
    (tmp_path / "f.root").write_bytes(data)
    assert checksum.legacy_dirhash(tmp_path / "f.root") == hashlib.sha512(data).hexdigest()


def test_legacy_dirhash_fifo_inside_raises_value_error(tree: Path) -> None:
    os.mkfifo(tree / "sub/fifo")
    with pytest.raises(ValueError, match="sub/fifo"):
        checksum.legacy_dirhash(tree)


# ---- checksum_kind and compute_checksum_like -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [("adler32:" + "0" * 64, "adler32"), (SHA512_OF_NOTHING, "sha512-dirhash")],
)
def test_checksum_kind_known_format_returns_kind(value: str, kind: str) -> None:
    assert checksum.checksum_kind(value) == kind


@pytest.mark.parametrize(
    "value",
    [None, "", "adler32:", "adler32:" + "0" * 63, "0" * 127, SHA512_OF_NOTHING.upper(), "md5:ab",
     ":a:b:c", "n/a", 42],
)
def test_checksum_kind_unknown_format_is_unknown_never_raises(value: str) -> None:
    assert checksum.checksum_kind(value) == "unknown"
    with pytest.raises(ValueError, match="not a cax checksum"):
        checksum.compute_checksum_like("/nonexistent", value)


def test_compute_checksum_like_legacy_reference_uses_dirhash(tree: Path) -> None:
    assert checksum.compute_checksum_like(tree, SHA512_OF_NOTHING) == (naive_dirhash(tree), None)


def test_compute_checksum_like_adler32_reference_returns_manifest(tree: Path) -> None:
    value, manifest = checksum.compute_checksum_like(tree, "adler32:" + "f" * 64)
    assert manifest == naive_manifest(tree)
    assert value == naive_dataset_checksum(manifest)


def test_compute_checksum_like_bad_reference_raises_value_error(tree: Path) -> None:
    with pytest.raises(ValueError):
        checksum.compute_checksum_like(tree, "sha1:abc")


# ---- REMOTE_MANIFEST_SCRIPT and parse_remote_manifest -------------------------------------------


def test_remote_manifest_script_tree_matches_scan_dataset(tree: Path) -> None:
    assert checksum.parse_remote_manifest(run_remote_script(tree)) == checksum.scan_dataset(tree)


def test_remote_manifest_script_single_file_matches_scan_dataset(tmp_path: Path) -> None:
    (tmp_path / "p.root").write_bytes(seeded(3).randbytes(100_000))
    remote = checksum.parse_remote_manifest(run_remote_script(tmp_path / "p.root"))
    assert remote == checksum.scan_dataset(tmp_path / "p.root")


def test_remote_manifest_script_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        checksum.parse_remote_manifest(run_remote_script(tmp_path / "nope"))


def test_remote_manifest_script_hostile_path_is_never_interpreted(tmp_path: Path) -> None:
    root = tmp_path / """run 'a' "b" $(touch pwned) `touch pwned2`; rm -rf x"""
    make_tree(root, {"f 1.bin": b"data", "$(id)/g": b"more"})
    remote = checksum.parse_remote_manifest(run_remote_script(root, cwd=tmp_path))
    assert remote == checksum.scan_dataset(root) == naive_manifest(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]


def test_remote_manifest_script_special_file_raises_plain_oserror(tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    stdout = run_remote_script(tree)
    assert json.loads(stdout)["errno"] is None
    with pytest.raises(OSError, match="fifo") as caught:
        checksum.parse_remote_manifest(stdout)
    assert type(caught.value) is OSError


def test_remote_manifest_script_relative_path_reports_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="absolute"):
        checksum.parse_remote_manifest(run_remote_script("relative/path"))


def test_remote_manifest_script_source_is_python36_stdlib_only() -> None:
    tree = ast.parse(checksum.REMOTE_MANIFEST_SCRIPT, feature_version=(3, 6))
    imported = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    assert imported <= sys.stdlib_module_names
    # Python < 3.9 evaluates annotations at definition time: only plain builtin names are safe.
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    annotations = [a.annotation for f in functions for a in f.args.args] + [
        f.returns for f in functions
    ]
    allowed = {"bytes", "str", "int", "bool", "tuple", "list", "dict"}
    assert all(a is None or (isinstance(a, ast.Name) and a.id in allowed) for a in annotations)


def test_parse_remote_manifest_banner_before_reply_is_ignored() -> None:
    stdout = 'Welcome to site B\n\n{"files": {"a": [3, "024d0127"]}}\n'
    assert checksum.parse_remote_manifest(stdout) == {"a": (3, "024d0127")}


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "bash: python3: command not found\n",
        '{"files": ["a"]}',
        '{"files": {"a": [3]}}',
        '{"files": {"a": ["3", "024d0127"]}}',
        '{"files": {"a": [3, "XYZ"]}}',
        '{"error": "boom", "errno": null}',
    ],
)
def test_parse_remote_manifest_bad_reply_raises_oserror(stdout: str) -> None:
    with pytest.raises(OSError):
        checksum.parse_remote_manifest(stdout)


def test_parse_remote_manifest_errno_13_raises_permission_error() -> None:
    with pytest.raises(PermissionError, match="denied"):
        checksum.parse_remote_manifest('{"error": "Permission denied: /d/x", "errno": 13}')
