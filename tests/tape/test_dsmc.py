"""The dsmc client against the emulator: argv, setup, timeouts, prompts; and the round trips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cax.checksum import dataset_checksum, legacy_dirhash, scan_dataset
from cax.errors import ChecksumMismatchError, ConfigError, TapeError
from cax.tape.dsmc import Dsmc, TsmSetup
from cax.tape.output import TapeOutcomeError
from cax.tape.roundtrip import SourceMismatch, backup_and_verify, restore_and_verify
from cax.tape.staging import DatasetRefused, original_name, tape_name


def make_dataset(path: Path, files: int = 3, size: int = 20_000) -> Path:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"XENON1T-0-{i:09d}.zip").write_bytes(os.urandom(size))
    return path


@pytest.fixture
def sites(tmp_path: Path):
    raw, tsm = tmp_path / "raw", tmp_path / "tsm"
    raw.mkdir()
    tsm.mkdir()
    return raw, tsm


def client(**setup) -> Dsmc:
    return Dsmc(TsmSetup.of({"timeout": 60, **setup}))


def test_setup_validation_names_each_bad_key():
    with pytest.raises(ConfigError) as info:
        TsmSetup.of({"dsmc": "", "backup": "tar", "optfile": "rel/dsm.opt", "colour": 1})
    text = "\n".join(info.value.problems)
    for word in ("colour", "dsmc", "backup", "optfile"):
        assert word in text


def test_argv_carries_node_options_and_never_a_shell(fake_tape, monkeypatch):
    monkeypatch.setenv("TSM_PW", "s3cret")
    c = client(dsmc=str(fake_tape.dsmc), optfile="/etc/dsm.opt", virtualnodename="XE1T",
               asnode="XENON", password_env="TSM_PW", options=["-quiet"])
    argv = c.restore_argv("/tsm/a b", "/raw/x")
    assert argv[:4] == [str(fake_tape.dsmc), "restore", "/tsm/a b/", "/raw/x/"]
    for opt in ("-replace=yes", "-subdir=yes", "-optfile=/etc/dsm.opt", "-virtualnodename=XE1T",
                "-asnode=XENON", "-password=s3cret", "-quiet"):
        assert opt in argv
    run = c.query("/nothing/here")
    assert "s3cret" not in " ".join(run.argv)
    assert fake_tape.calls()[-1][:2] == ["query", "backup"]
    assert run.output.codes() == ["ANS1092W"] and run.output.returncode == 8


def test_init_script_variables_reach_the_client(tmp_path, fake_tape):
    script = tmp_path / "init_tsm.sh"
    script.write_text(f"export FAKE_DSMC_TAPE={fake_tape.root}/other\nexport DSM_DIR=/opt/x\n")
    c = Dsmc(TsmSetup.of({"init_script": str(script), "env": {"DSM_LOG": "/tmp"}}))
    env = c.environment()
    assert env["DSM_DIR"] == "/opt/x" and env["DSM_LOG"] == "/tmp"
    c.query("/x")
    assert (fake_tape.root / "other" / "calls.log").exists()


def test_a_failing_init_script_is_a_tape_error(tmp_path):
    script = tmp_path / "init.sh"
    script.write_text("exit 3\n")
    with pytest.raises(TapeError, match="init script"):
        Dsmc(TsmSetup.of({"init_script": str(script)})).environment()


def test_missing_client_is_a_tape_error(tmp_path):
    with pytest.raises(TapeError, match="cannot start"):
        client(dsmc=str(tmp_path / "no-dsmc")).query("/x")


def test_a_hang_is_killed_at_the_timeout_and_keeps_the_output(fake_tape):
    fake_tape.set({"*": ["hang"]})
    run = Dsmc(TsmSetup.of({"timeout": 5, "seconds_per_gb": 1})).query("/x")
    assert run.timed_out and run.output.returncode is None
    assert any("Session established" in line for line in run.output.lines)


def test_a_prompt_never_reads_our_stdin_and_is_killed_at_once(fake_tape):
    fake_tape.set({"*": ["prompt"]})
    run = Dsmc(TsmSetup.of({"timeout": 600})).query("/x")
    assert run.prompted and not run.timed_out and run.seconds < 300
    assert run.output.prompt.startswith("Please enter password")


def test_tape_names_round_trip_for_every_dataset_name():
    for dataset in ("170101_0000", "170101_0000_MV", "x", "a_b_c_d_e_f"):
        prefix = f"{dataset}_"
        for rel in ("XENON1T-0-000000000.zip", "trigger_monitor_data.zip", "_odd"):
            assert original_name(tape_name(rel, prefix), prefix) == rel


@pytest.mark.parametrize("dataset, sep", [("170101_0000", ","), ("170101_0000_MV", "."),
                                          ("170102_0000", " ")])
def test_backup_then_restore_round_trip(sites, fake_tape, dataset, sep):
    raw, tsm = sites
    fake_tape.set(sep=sep)
    source = make_dataset(raw / dataset)
    manifest = scan_dataset(source)
    (tsm / dataset).mkdir()  # a dead attempt's staging and verification scratch
    (tsm / f".cax-verify-{dataset}-dead").mkdir()
    c = client()
    copy = backup_and_verify(c, str(source), str(tsm), dataset, "tok1",
                             recorded=manifest, checksum=dataset_checksum(manifest))
    assert copy.checksum == dataset_checksum(manifest) and copy.prefix == f"{dataset}_"
    assert copy.location == str(tsm / dataset)
    assert os.listdir(tsm) == []  # staging and scratch are gone
    on_tape = sorted(p.name for p in fake_tape.stored(copy.location).iterdir())
    assert on_tape == sorted(f"{dataset}_{name}" for name in manifest)
    final = raw / "restored" / dataset
    final.parent.mkdir()
    got = restore_and_verify(c, copy.location, copy.prefix, str(final),
                             str(raw / f".{dataset}.restore"), copy.checksum, copy.manifest)
    assert got == manifest and sorted(os.listdir(final)) == sorted(manifest)
    assert not (raw / f".{dataset}.restore").exists()


def test_restore_verifies_a_legacy_sha512_entry_and_undoes_the_mv_prefix(sites, fake_tape):
    raw, tsm = sites
    dataset = "170101_0000_MV"
    source = make_dataset(raw / dataset)
    legacy = legacy_dirhash(source)
    c = client()
    copy = backup_and_verify(c, str(source), str(tsm), dataset, "t", checksum=legacy)
    final = raw / "back" / dataset
    final.parent.mkdir()
    restore_and_verify(c, copy.location, f"{dataset}_", str(final), str(raw / ".s"), legacy)
    assert sorted(os.listdir(final)) == sorted(os.listdir(source))


def test_source_not_matching_its_checksum_is_not_backed_up(sites, fake_tape):
    raw, tsm = sites
    source = make_dataset(raw / "170101_0000")
    manifest = scan_dataset(source)
    (source / "XENON1T-0-000000001.zip").write_bytes(b"changed")
    with pytest.raises(SourceMismatch):
        backup_and_verify(client(), str(source), str(tsm), "170101_0000", "t",
                          recorded=manifest)
    assert os.listdir(tsm) == [] and not fake_tape.calls()


@pytest.mark.parametrize("layout, match", [
    ("subdir", "sub-folder"), ("duplicate", "identical content"), ("empty", "no files")])
def test_datasets_the_original_refused_are_refused(sites, fake_tape, layout, match):
    raw, tsm = sites
    source = raw / "170101_0000"
    source.mkdir()
    if layout == "subdir":
        (source / "sub").mkdir()
        (source / "a").write_bytes(b"1")
    elif layout == "duplicate":
        (source / "a").write_bytes(b"same")
        (source / "b").write_bytes(b"same")
    with pytest.raises(DatasetRefused, match=match):
        backup_and_verify(client(), str(source), str(tsm), "170101_0000", "t")
    assert os.listdir(tsm) == [] and not fake_tape.calls()


MODES = [
    ("incremental", "reject", TapeOutcomeError, "ANS1017E"),
    ("incremental", "skip", TapeOutcomeError, "accounted for 2 of 3"),
    ("incremental", "warn", TapeOutcomeError, "ANS1115W"),
    ("incremental", "garbage", TapeOutcomeError, "unexpected output"),
    ("incremental", "nothing", TapeOutcomeError, "nothing on tape"),
    ("restore", "corrupt", ChecksumMismatchError, "differ from what was backed up"),
    ("restore", "reject", TapeOutcomeError, "ANS1017E"),
    ("restore", "hang", TapeOutcomeError, "timed out"),
    ("incremental", "prompt", TapeOutcomeError, "Please enter password"),
]


@pytest.mark.parametrize("command, mode, error, match", MODES)
def test_every_failure_mode_fails_the_upload_and_cleans_up(sites, fake_tape, command, mode,
                                                           error, match):
    raw, tsm = sites
    source = make_dataset(raw / "170101_0000")
    fake_tape.set({command: [mode]})
    with pytest.raises(error, match=match):
        backup_and_verify(client(timeout=5 if mode == "hang" else 600), str(source), str(tsm),
                          "170101_0000", "t")
    assert os.listdir(tsm) == []


def test_a_replace_prompt_is_seen_and_killed_and_our_restores_never_ask(sites, fake_tape):
    raw, tsm = sites
    source = make_dataset(raw / "170101_0000", files=1)
    c = client(timeout=600)
    assert c.backup(str(source)).output.returncode == 0
    assert c.restore(str(source), str(tsm)).output.returncode == 0
    again = c.restore(str(source), str(tsm))  # the files exist now: -replace=yes answers
    assert again.output.returncode == 0 and not again.prompted
    argv = [a for a in c.restore_argv(str(source), str(tsm)) if not a.startswith("-replace")]
    asked = c.run(argv, 600)
    assert asked.prompted and asked.output.prompt.startswith("Action [")
