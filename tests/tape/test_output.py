"""The dsmc output parser and judges, on recorded samples of the client's documented formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from cax.tape import output
from cax.tape.output import TapeOutcomeError, judge_backup, judge_restore, parse

SAMPLES = Path(__file__).parent / "samples"
STAGE = "/data/xenon/tsm/170101_0000"


def sample(name: str, rc: int | None = 0) -> output.DsmcOutput:
    return parse((SAMPLES / name).read_text(), rc)


@pytest.mark.parametrize("text, value", [
    ("19,295.48", 19295.48), ("19.295,48", 19295.48), ("19 295,48", 19295.48),
    ("19\u00a0295,48", 19295.48), ("8.20", 8.2), ("8,20", 8.2), ("1,234", 1234),
    ("1.234.567", 1234567), ("1 234 567", 1234567), ("0", 0), ("117.521,31", 117521.31),
])
def test_parse_decimal_reads_every_locale(text, value):
    assert output.parse_decimal(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "1,2O4", "12,34,56.7", "1.2.3,4,5", "abc", "1,"])
def test_parse_decimal_refuses_malformed_numbers(text):
    with pytest.raises(ValueError):
        output.parse_decimal(text)


@pytest.mark.parametrize("text, value", [
    ("154.57 MB", round(154.57 * 2**20)), ("3,00 KB", 3072), ("1,048,576 B", 1048576),
    ("0.00  B", 0), ("1 234,50 GB", round(1234.5 * 2**30)),
])
def test_parse_bytes_with_units(text, value):
    assert output.parse_bytes(text) == value


def test_parse_durations_and_rates():
    assert output.parse_seconds("00:43:44") == 2624
    assert output.parse_seconds("1,234:05:06") == 1234 * 3600 + 306
    assert output.parse_seconds("1.208,20 sec") == pytest.approx(1208.2)
    assert output.parse_rate("19,295.48 KB/sec") == pytest.approx(19295.48 * 1024)
    with pytest.raises(ValueError):
        output.parse_seconds("00:61:00")


@pytest.mark.parametrize("name", ["incremental_comma.txt", "incremental_dot.txt",
                                  "incremental_space.txt"])
def test_incremental_summary_is_the_same_in_every_locale(name):
    out = sample(name)
    assert out.summary.counts["inspected"] == 1204
    assert out.summary.counts["backed_up"] == 1204
    assert out.summary.counts["failed"] == 0
    assert out.summary.counts["retries"] == 0
    assert out.summary.bytes["transferred"] == round(117521.31 * 2**20)
    assert out.summary.seconds["data_transfer_time"] == pytest.approx(1208.2)
    assert out.summary.seconds["elapsed_processing_time"] == 3600 + 43 * 60 + 44
    assert out.summary.rates["aggregate_data_transfer_rate"] == pytest.approx(19295.48 * 1024)
    assert out.codes() == ["ANS1898I"]
    sizes = [o.size for o in out.objects]
    assert sizes == [4096, 104857600, 104857600, 12345678]
    assert out.objects[1].path == f"{STAGE}/170101_0000_XENON1T-0-000000000.zip"
    assert out.objects[1].status == "Sent" and out.objects[0].action == "Directory"
    assert not out.unparsed and not out.problems


def test_restore_lines_keep_source_destination_and_status():
    out = sample("restore.txt")
    assert out.summary.counts == {"restored": 3, "failed": 0}
    first = out.objects[1]
    assert first.action == "Restoring" and first.size == 52428800 and first.status == "Done"
    assert first.path.endswith("170101_0000_MV/170101_0000_MV_XENON1T-0-000000000.zip")
    assert first.dest.startswith("/data/xenon/raw/.170101_0000_MV/")
    judge_restore(out)


def test_query_rows():
    out = sample("query_backup.txt")
    assert [(r.size, r.mgmt_class, r.state) for r in out.rows] == [
        (52428800, "STANDARD", "A"), (1234567, "STANDARD", "I")]
    assert out.rows[1].path.endswith("170101_0000_MV_trigger.zip")
    assert out.rows[0].date == "07/12/2020 14:09:12"
    archive = sample("query_archive.txt")
    assert [(r.size, r.path) for r in archive.rows] == [
        (607, f"{STAGE}/170101_0000_a.zip")]


def test_messages_carry_their_severity():
    out = sample("failed_object.txt", 12)
    assert [(m.code, m.severity) for m in out.messages] == [
        ("ANS1228E", "E"), ("ANS4037E", "E"), ("ANS1512E", "E")]
    assert out.errors()[0].text.startswith("Sending of object")


def expected_files(out):
    return {o.path for o in out.objects if o.action == "Normal File"}


def test_judge_backup_refuses_a_summary_that_disagrees_with_the_file_lines():
    out = sample("incremental_comma.txt")
    files = expected_files(out) | {f"{STAGE}/other{i}.zip" for i in range(1200)}
    # 3 listed + 1200 unlisted = 1203 files; the summary says 1204 objects incl. the directory
    # were backed up, but only 3 file lines were printed: counter and lines disagree
    with pytest.raises(TapeOutcomeError, match="listed"):
        judge_backup(out, files)


def backup_text(sent: int, inspected: int, backed_up: int, failed: int = 0,
                directory: bool = True) -> str:
    lines = ["Node Name: X", f"Incremental backup of volume '{STAGE}/'"]
    if directory:
        lines.append(f"Directory-->  4,096 {STAGE} [Sent]")
    lines += [f"Normal File-->  1,000 {STAGE}/f{i} [Sent]" for i in range(sent)]
    lines += [f"Total number of objects inspected: {inspected:,}",
              f"Total number of objects backed up: {backed_up:,}",
              f"Total number of objects failed: {failed}",
              "Total number of bytes transferred: 1.00 KB",
              "Elapsed processing time: 00:00:01"]
    return "\n".join(lines)


FILES3 = {f"{STAGE}/f{i}" for i in range(3)}


@pytest.mark.parametrize("text, rc, ok", [
    (backup_text(3, 4, 4), 0, True),  # all sent, directory too
    (backup_text(0, 4, 0, directory=False), 0, True),  # already on tape, unchanged
    (backup_text(3, 4, 4), 4, True),  # rc 4 but every file accounted for
    (backup_text(2, 3, 3), 4, False),  # one file skipped
    (backup_text(3, 4, 4), 8, False),  # warnings
    (backup_text(3, 4, 4), 12, False),
    (backup_text(3, 4, 4, failed=1), 0, False),
    (backup_text(3, 4, 4), None, False),  # killed
    (backup_text(3, 4, 4), 99, False),
    ("Node Name: X\n", 0, False),  # no summary at all
])
def test_judge_backup_uses_rc_messages_and_counters_together(text, rc, ok):
    out = parse(text, rc)
    if ok:
        judge_backup(out, FILES3)
    else:
        with pytest.raises(TapeOutcomeError):
            judge_backup(out, FILES3)


def test_judge_backup_refuses_files_outside_the_dataset():
    out = parse(backup_text(3, 4, 4), 0)
    with pytest.raises(TapeOutcomeError, match="outside"):
        judge_backup(out, {f"{STAGE}/f0", f"{STAGE}/f1", f"{STAGE}/zz"})


def test_session_rejected_is_an_error_with_the_message_and_raw_lines():
    out = sample("session_rejected.txt", 12)
    with pytest.raises(TapeOutcomeError, match="ANS1017E Session rejected") as info:
        judge_backup(out, FILES3)
    assert info.value.lines[-1].startswith("ANS1017E")
    assert not info.value.permanent


def test_nothing_on_tape_fails_a_restore():
    with pytest.raises(TapeOutcomeError, match="nothing on tape: ANS1092W"):
        judge_restore(sample("no_match.txt", 8))


def test_unparseable_counter_is_an_error_not_a_crash():
    out = sample("truncated.txt", 0)
    assert out.problems and "1,2O4" in out.problems[0]
    with pytest.raises(TapeOutcomeError, match="unexpected output"):
        judge_backup(out, FILES3)


def test_a_prompt_is_reported_as_permanent():
    out = parse('Node Name: X\nPlease enter password for node "X": ', None)
    assert out.prompt
    with pytest.raises(TapeOutcomeError, match="waited for an answer") as info:
        judge_restore(out)
    assert info.value.permanent


def test_parse_never_raises_on_binary_noise():
    out = parse("\x00\xff garbage\nTotal number of objects failed: lots\n-->\n", 0)
    assert out.problems and out.unparsed
