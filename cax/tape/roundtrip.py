"""The two tape round trips: back up and prove readable, and restore and verify.

Both work in scratch places owned by one claim and remove them in every outcome.  Bytes are
read three times per upload: staging (copy and checksum in one read), the client's backup, and
the checksum of the verification restore.  The original read them about six times.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cax.checksum import (
    Manifest,
    checksum_kind,
    dataset_checksum,
    diff_manifests,
    legacy_dirhash,
    scan_dataset,
)
from cax.errors import ChecksumMismatchError
from cax.tape import output
from cax.tape.dsmc import Dsmc, DsmcRun, check_finished
from cax.tape.staging import (
    find_restored,
    legacy_from_sha512,
    remove_tree,
    stage,
    tape_prefix,
    unstage_names,
)

log = logging.getLogger(__name__)
raw_log = logging.getLogger("cax.tape.dsmc.output")



class NoKeeper:
    """Stands in for cax.claimed.Keeper outside a claim (tests, benchmarks)."""

    lost = None

    def check(self, need_fraction: float = 0.0) -> None:
        """Never raises: nothing can be lost."""

    def add_stopper(self, stop: Callable[[], None]) -> None:
        """Nothing ever stops the work."""

    def remove_stopper(self, stop: Callable[[], None]) -> None:
        """Nothing to remove."""


class SourceMismatch(ChecksumMismatchError):
    """The local copy read for tape does not match its own registered checksum."""

    retryable = False


@dataclass
class TapeCopy:
    """A dataset proven readable on tape: what to register, and what it cost."""

    location: str  # the tape object path (the staging directory's path)
    prefix: str
    manifest: Manifest  # under the original names
    checksum: str
    mode: str
    files: int
    size: int
    backup_seconds: float
    verify_seconds: float
    bytes_read: int  # by cax itself (staging and verification), not by dsmc


def _log_output(run: DsmcRun) -> None:
    for line in run.output.lines:
        raw_log.info("dsmc: %s", line)
    for line in run.output.unparsed:
        log.debug("dsmc line not understood: %s", line)


def _run(what: str, call: Callable[[], DsmcRun], keeper: Any) -> DsmcRun:
    run = call()
    _log_output(run)
    if run.stopped:
        keeper.check()  # raises the reason it was stopped for (the claim was lost)
    check_finished(run, what)
    return run


def _summary_line(what: str, run: DsmcRun) -> str:
    s = run.output.summary
    moved = s.bytes.get("transferred", 0)
    rate = s.rates.get("aggregate_data_transfer_rate", 0.0)
    objects = sum(s.counts.get(k, 0) for k in ('backed_up', 'archived', 'restored', 'retrieved'))
    return (f"{what}: {objects} object(s), {moved} bytes, {rate / 1e6:.1f} MB/s, "
            f"{run.seconds:.1f} s")


def verify_source(staged_manifest: Manifest, sha512: dict[str, str], recorded: Manifest | None,
                  checksum: str | None, where: str) -> None:
    """Refuse to back up a copy whose bytes (as read for staging) differ from its checksum."""
    if recorded is not None:
        bad = diff_manifests(recorded, staged_manifest)
        if bad:
            raise SourceMismatch(f"{where}: {len(bad)} file(s) differ from the recorded "
                                 f"checksums: {', '.join(bad[:5])}", files=bad)
    if not checksum:
        return
    if checksum_kind(checksum) == "adler32":
        if dataset_checksum(staged_manifest) != checksum:
            raise SourceMismatch(f"{where}: the copy does not match its registered checksum")
    elif legacy_from_sha512(sha512) != checksum:
        raise SourceMismatch(f"{where}: the copy does not match its legacy sha512 checksum")


def backup_and_verify(client: Dsmc, source: str, dir_tsm: str, dataset: str, token: str, *,
                      recorded: Manifest | None = None, checksum: str | None = None,
                      keeper: Any = None) -> TapeCopy:
    """Stage ``source`` into ``dir_tsm/<dataset>``, back it up, restore it to a scratch place
    and compare every file with the bytes staged.  Returns the TapeCopy to register.

    ``recorded``/``checksum`` are the local copy's manifest and checksum: the staged bytes must
    match them, so what goes to tape is the verified data.  ``keeper`` (the claim's
    cax.claimed.Keeper) is checked between steps and per block while staging, and kills a
    running dsmc when the lease is lost.  Staging and scratch are removed in every outcome.
    """
    keeper = keeper or NoKeeper()
    check = keeper.check
    setup = client.setup
    staging = os.path.join(dir_tsm, dataset)
    scratch = os.path.join(dir_tsm, f".cax-verify-{dataset}-{token}")
    legacy = bool(checksum) and checksum_kind(checksum) == "sha512-dirhash"
    backup_verb, restore_verb = client.verb
    try:
        remove_tree(staging)  # an earlier attempt's leftovers; the claim makes this ours
        for name in os.listdir(dir_tsm):  # verification scratch of attempts that died
            if name.startswith(f".cax-verify-{dataset}-"):
                remove_tree(os.path.join(dir_tsm, name))
        staged = stage(source, staging, tape_prefix(dataset, setup.rename),
                       subdirs=setup.subdirs, want_sha512=legacy, check=check)
        verify_source(staged.manifest, staged.sha512, recorded, checksum, source)
        check()
        backup = _run(setup.backup, lambda: client.backup(staging, staged.size, keeper=keeper),
                      keeper)
        output.judge_backup(backup.output, [staged.staged_path(r) for r in staged.manifest],
                            backup_verb)
        log.info("%s", _summary_line(f"backed up {staging}", backup))
        check()
        os.mkdir(scratch)
        restore = _run("restore", lambda: client.restore(staging, scratch, staged.size,
                                                         keeper=keeper), keeper)
        output.judge_restore(restore.output, len(staged.manifest), restore_verb)
        restored = scan_dataset(find_restored(scratch, dataset))
        bad = diff_manifests(staged.staged_manifest(), restored)
        if bad:
            raise ChecksumMismatchError(
                f"{staging}: {len(bad)} file(s) restored from tape differ from what was backed "
                f"up: {', '.join(bad[:5])}", files=bad)
        log.info("%s; every file verified", _summary_line(f"restored {staging}", restore))
        return TapeCopy(staging, staged.prefix, staged.manifest,
                        dataset_checksum(staged.manifest), setup.backup, len(staged.manifest),
                        staged.size, backup.seconds, restore.seconds,
                        staged.bytes_read + staged.size)
    finally:
        for path in (staging, scratch):
            try:
                remove_tree(path)
            except OSError as exc:
                log.error("cannot remove %s: %s", path, exc)


def restore_and_verify(client: Dsmc, tape_location: str, prefix: str, final: str, scratch: str,
                       reference: str, tape_manifest: Manifest | None = None, *,
                       keeper: Any = None) -> Manifest:
    """Restore the tape copy into ``scratch``, undo the tape names, verify it against the tape
    entry's ``reference`` checksum (adler32 manifest or the original's sha512 dirhash), and
    rename it to ``final``.  Returns the manifest of the restored copy.

    ``scratch`` is removed in every outcome; ``final`` is only ever the verified copy.
    """
    keeper = keeper or NoKeeper()
    check = keeper.check
    dataset = os.path.basename(tape_location.rstrip("/"))
    _, restore_verb = client.verb
    try:
        remove_tree(scratch)
        os.mkdir(scratch)
        restore = _run("restore", lambda: client.restore(tape_location, scratch, 0,
                                                         keeper=keeper), keeper)
        output.judge_restore(restore.output, None, restore_verb)
        found = find_restored(scratch, dataset)
        unstage_names(found, prefix)
        check()
        manifest = scan_dataset(found)
        if checksum_kind(reference) == "adler32":
            if dataset_checksum(manifest) != reference:
                bad = diff_manifests(tape_manifest, manifest) if tape_manifest else []
                raise ChecksumMismatchError(
                    f"{tape_location}: the restored data do not match the tape checksum"
                    + (f": {', '.join(bad[:5])}" if bad else ""), files=bad)
        elif legacy_dirhash(found) != reference:
            raise ChecksumMismatchError(f"{tape_location}: the restored data do not match the "
                                        "legacy sha512 checksum of the tape entry")
        log.info("%s; verified", _summary_line(f"restored {tape_location}", restore))
        check(0.15)  # the rename and the registration must fit in the lease
        if os.path.lexists(final):
            raise FileExistsError(f"{final} exists; not replacing it with the tape copy")
        os.rename(found, final)
        return manifest
    finally:
        try:
            remove_tree(scratch)
        except OSError as exc:
            log.error("cannot remove %s: %s", scratch, exc)
