"""Parse the output of IBM Spectrum Protect's ``dsmc`` into typed results, and judge them.

The client prints a banner, one line per object it sends or restores, ``ANSnnnnX`` messages and a
summary block of ``Total number of ...:`` counters; numbers use the locale's thousands separator
(``1,234``, ``1.234``, ``1 234``) and two decimals for bytes, rates and times. The original cax
parsed this with substring matches, ignored the return code, and crashed (KeyError, ValueError)
on a summary it did not expect. Here parsing never raises: a line that is not understood is kept
in ``unparsed``, and the *judges* (``judge_backup``, ``judge_restore``) decide success from the
return code, the messages and the counters together, raising TapeError with the raw lines kept
for the log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cax.errors import TapeError

RC_OK, RC_SKIPPED, RC_WARNING, RC_ERROR = 0, 4, 8, 12
#: Return codes of a run that may have worked; the counters must still agree.
RC_GOOD = (RC_OK, RC_SKIPPED)
KNOWN_RCS = (RC_OK, RC_SKIPPED, RC_WARNING, RC_ERROR)

SEVERITY = {"I": "information", "W": "warning", "E": "error", "S": "severe error"}
UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "PB": 1 << 50}

#: Messages that mean "nothing on tape matches" (query, restore, retrieve).
NOTHING_FOUND = ("ANS1092W", "ANS1302E", "ANS1345E")
#: Messages whose cause is the site's setup, not bad luck: retrying without a change cannot help.
SETUP_ERRORS = ("ANS1025E", "ANS1107E", "ANS1217E", "ANS1353E", "ANS1038S", "ANS1036S",
                "ANS2050E", "ANS1503E")

_MESSAGE = re.compile(r"\b(AN[SER])(\d{4})([IWES])\b\s*(.*)")
_COUNTER = re.compile(
    r"^\s*Total number of (objects |subfile objects )?([A-Za-z ]+?)\s*:\s*(.+?)\s*$")
_FIELD = re.compile(r"^\s*([A-Z][A-Za-z ]+?)\s*:\s*(.+?)\s*$")
_GROUPED_INT = r"\d{1,3}(?:[,. '\u00a0\u202f]\d{3})*|\d+"
_OBJECT = re.compile(
    r"^\s*(Normal File|Directory|Updating|Expiring|Symbolic Link|Restoring|Retrieving|Archiving)"
    r"\s*(?:-->)?\s+(" + _GROUPED_INT + r")\s+(.+?)\s*(?:\[(\w[\w ]*)\])?\s*$")
_QUERY = re.compile(
    r"^\s*(" + _GROUPED_INT + r")\s+B\s+(\d\d/\d\d/\d{2,4}\s+\d\d:\d\d:\d\d)\s+(.*?)\s*$")
_PROMPT = re.compile(r"(Action \[|\(y/n\)|\(Yes \(Y\)/No \(N\)\)|Please enter|"
                     r"User Action is Required|password:)", re.IGNORECASE)
_NOISE = re.compile(
    r"^\s*($|IBM (Tivoli Storage Manager|Spectrum Protect)|Command Line Backup|Client Version|"
    r"Client date/time|\(c\) Copyright|Node Name:|Session established|Server Version|"
    r"Server date/time|Accessing as node|Incremental backup of|Successful incremental|"
    r"Restore function invoked|Restore processing finished|Retrieve function invoked|"
    r"Retrieve processing finished|Archive function invoked|Query Backup|Query Archive|"
    r"Size\s+(Backup|Archive) Date|-{3,}|Selective backup of|Successful selective|"
    r"Processing|Waiting for|Expanding|Last access)")


def asks(line: str) -> bool:
    """Whether ``line`` is a question the client waits on (password, replace, user action)."""
    return _PROMPT.search(line) is not None


def parse_int(text: str) -> int:
    """Return an integer printed with any thousands separator (``1,234`` ``1.234`` ``1 234``).

    Raises ValueError if ``text`` is not such an integer.
    """
    text = text.strip()
    if not re.fullmatch(_GROUPED_INT, text):
        raise ValueError(f"not a counter: {text!r}")
    return int(re.sub(r"\D", "", text))


def parse_decimal(text: str) -> float:
    """Return a number printed with a locale's separators: ``19,295.48``, ``19.295,48``,
    ``19 295,48``, ``8.20``, ``1,234`` (grouped integer).

    dsmc prints two decimals for bytes, rates and times, so a lone separator followed by exactly
    three digits groups thousands; any other last separator is the decimal point.
    Raises ValueError for anything else.
    """
    text = text.strip().replace("\u00a0", " ").replace("\u202f", " ")
    if not re.fullmatch(r"\d[\d,. ']*", text) or text[-1] in ",. '":
        raise ValueError(f"not a number: {text!r}")
    seps = [(i, c) for i, c in enumerate(text) if c in ",. '"]
    if not seps:
        return float(text)
    last_i, last_c = seps[-1]
    if last_c in " '" or (len(text) - last_i - 1 == 3 and _grouped(text, last_c)):
        return float(parse_int(text))
    whole, frac = text[:last_i], text[last_i + 1:]
    if last_c in whole or not re.fullmatch(_GROUPED_INT, whole):
        raise ValueError(f"not a number: {text!r}")
    return float(re.sub(r"\D", "", whole) + "." + frac)


def _grouped(text: str, sep: str) -> bool:
    """Whether ``text`` is digits grouped by threes with ``sep`` (so ``1,234`` is 1234)."""
    return re.fullmatch(r"\d{1,3}(?:" + re.escape(sep) + r"\d{3})+", text) is not None


def parse_bytes(text: str) -> int:
    """Return bytes from ``154.57 MB`` / ``3,00 KB`` / ``1,048,576 B`` (binary units, as dsmc)."""
    match = re.fullmatch(r"\s*([\d.,' \u00a0\u202f]+?)\s*([KMGTP]?B)\s*", text)
    if not match:
        raise ValueError(f"not a byte count: {text!r}")
    return round(parse_decimal(match.group(1)) * UNITS[match.group(2)])


def parse_rate(text: str) -> float:
    """Return bytes per second from ``19,295.48 KB/sec``."""
    match = re.fullmatch(r"\s*(.+?)\s*([KMGTP]?B)/s(?:ec)?\s*", text)
    if not match:
        raise ValueError(f"not a rate: {text!r}")
    return parse_decimal(match.group(1)) * UNITS[match.group(2)]


def parse_seconds(text: str) -> float:
    """Return seconds from ``8.20 sec`` or an elapsed time ``00:43:44`` / ``1,234:05:06``."""
    text = text.strip()
    match = re.fullmatch(r"(.+?)\s*sec", text)
    if match:
        return parse_decimal(match.group(1))
    parts = text.split(":")
    if len(parts) == 3 and all(p.strip() for p in parts):
        hours, minutes, seconds = parse_int(parts[0]), int(parts[1]), parse_decimal(parts[2])
        if minutes < 60 and seconds < 61:
            return hours * 3600 + minutes * 60 + seconds
    raise ValueError(f"not a duration: {text!r}")


@dataclass(frozen=True)
class Message:
    """One ``ANSnnnnX`` message; ``severity`` is I, W, E or S."""

    code: str
    severity: str
    text: str

    @property
    def is_error(self) -> bool:
        return self.severity in ("E", "S")

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


@dataclass(frozen=True)
class ObjectLine:
    """One object the client sent, restored or expired: ``Normal File-->  1,024 /p [Sent]``."""

    action: str
    size: int
    path: str
    dest: str | None = None
    status: str | None = None

    @property
    def is_file(self) -> bool:
        return self.action not in ("Directory", "Symbolic Link", "Expiring")


@dataclass(frozen=True)
class QueryRow:
    """One row of ``query backup`` / ``query archive``: size, date, and the rest of the row."""

    size: int
    date: str
    path: str
    mgmt_class: str | None = None
    state: str | None = None  # A(ctive) or I(nactive), for backups


@dataclass
class Summary:
    """The closing summary block.  Counters are keyed like ``backed_up``, ``restored``."""

    counts: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def present(self) -> bool:
        return bool(self.counts)


@dataclass
class DsmcOutput:
    """Everything one dsmc run printed, parsed; ``lines`` keeps the raw text for the log."""

    returncode: int | None
    lines: list[str]
    messages: list[Message] = field(default_factory=list)
    objects: list[ObjectLine] = field(default_factory=list)
    rows: list[QueryRow] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)
    unparsed: list[str] = field(default_factory=list)
    prompt: str | None = None
    problems: list[str] = field(default_factory=list)  # lines that looked known but did not parse

    def codes(self) -> list[str]:
        return [m.code for m in self.messages]

    def errors(self) -> list[Message]:
        return [m for m in self.messages if m.is_error]

    def warnings(self) -> list[Message]:
        return [m for m in self.messages if m.severity == "W"]

    def files(self, actions: Iterable[str]) -> list[ObjectLine]:
        wanted = set(actions)
        return [o for o in self.objects if o.action in wanted and o.is_file]

    def raw(self, limit: int = 60) -> str:
        """The last ``limit`` raw lines, for the log of a failure."""
        return "\n".join(self.lines[-limit:])


def _summary_field(summary: Summary, label: str, value: str) -> None:
    key = label.strip().lower().replace(" ", "_")
    if key.startswith("total_number_of_bytes_"):
        summary.bytes[key[len("total_number_of_bytes_"):]] = parse_bytes(value)
    elif key in ("data_transfer_time", "elapsed_processing_time"):
        summary.seconds[key] = parse_seconds(value)
    elif key.endswith("_rate") and "/" in value:
        summary.rates[key] = parse_rate(value)
    else:
        summary.other[key] = value


_SUMMARY_LABELS = ("Data transfer time", "Network data transfer rate",
                   "Aggregate data transfer rate", "Objects compressed by",
                   "Total data reduction ratio", "Elapsed processing time",
                   "Deduplication reduction", "Total objects deduplicated",
                   "Total data reduction")


def parse(text: str | Sequence[str], returncode: int | None = None) -> DsmcOutput:
    """Parse the merged stdout/stderr of one dsmc run.  Never raises."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    out = DsmcOutput(returncode, lines)
    for line in lines:
        try:
            _parse_line(out, line)
        except ValueError as exc:
            out.problems.append(f"{line.strip()} ({exc})")
    return out


def _parse_line(out: DsmcOutput, line: str) -> None:
    message = _MESSAGE.search(line)
    if message:
        code = message.group(1) + message.group(2) + message.group(3)
        out.messages.append(Message(code, message.group(3), message.group(4).strip()))
        return
    counter = _COUNTER.match(line)
    if counter:
        kind, name, value = counter.groups()
        if name.strip() == "bytes" or name.startswith("bytes "):
            _summary_field(out.summary, "total number of " + name, value)
        else:
            key = ("subfile_" if kind and kind.startswith("subfile") else "") + \
                name.strip().lower().replace(" ", "_")
            out.summary.counts[key] = parse_int(value)
        return
    obj = _OBJECT.match(line)
    if obj:
        action, size, rest, status = obj.groups()
        source, _, dest = rest.partition(" --> ")
        out.objects.append(ObjectLine(action, parse_int(size), source.strip(),
                                      dest.strip() or None, status))
        return
    row = _QUERY.match(line)
    if row:
        size, date, rest = row.groups()
        parts = rest.split()
        if len(parts) >= 3 and parts[1] in ("A", "I") and not parts[0].startswith("/"):
            out.rows.append(QueryRow(parse_int(size), " ".join(date.split()),
                                     " ".join(parts[2:]), parts[0], parts[1]))
        else:  # query archive: path, then expiry and description
            out.rows.append(QueryRow(parse_int(size), " ".join(date.split()),
                                     parts[0] if parts else rest))
        return
    labelled = _FIELD.match(line)
    if labelled and labelled.group(1) in _SUMMARY_LABELS:
        _summary_field(out.summary, labelled.group(1), labelled.group(2))
        return
    if _PROMPT.search(line):
        out.prompt = line.strip()
        out.unparsed.append(line)
        return
    if not _NOISE.match(line):
        out.unparsed.append(line)


# -- judging: rc, messages and counters together ---------------------------------------------


class TapeOutcomeError(TapeError):
    """dsmc did not do what was asked.  ``permanent`` says retrying without a change is futile;
    ``lines`` keeps the raw output for the log."""

    def __init__(self, message: str, output: DsmcOutput | None = None, permanent: bool = False):
        super().__init__(message)
        self.output = output
        self.lines = list(output.lines) if output else []
        self.permanent = permanent
        self.retryable = not permanent


def _first_error(out: DsmcOutput) -> str:
    errors = out.errors() or out.warnings()
    return str(errors[0]) if errors else ""


def _check_common(out: DsmcOutput, what: str) -> None:
    """Refuse a run whose return code, prompt or messages say it failed."""
    if out.prompt:
        raise TapeOutcomeError(f"dsmc {what} waited for an answer ({out.prompt!r}); "
                               "check the client options (-replace, passwordaccess)", out,
                               permanent=True)
    if out.returncode not in KNOWN_RCS:
        raise TapeOutcomeError(f"dsmc {what} exited with status {out.returncode}"
                               f"{': ' + _first_error(out) if out.messages else ''}", out)
    setup = [m for m in out.messages if m.code in SETUP_ERRORS]
    if setup:
        raise TapeOutcomeError(f"dsmc {what}: {setup[0]}", out, permanent=True)
    if out.returncode not in RC_GOOD or out.errors():
        detail = _first_error(out) or "no message"
        raise TapeOutcomeError(f"dsmc {what} failed (status {out.returncode}): {detail}", out)
    if out.problems:
        raise TapeOutcomeError(f"dsmc {what}: unexpected output: {out.problems[0]}", out)
    if not out.summary.present:
        raise TapeOutcomeError(f"dsmc {what} printed no summary (status {out.returncode})", out)


def judge_backup(out: DsmcOutput, expected: Iterable[str], verb: str = "backed_up") -> None:
    """Accept a backup or archive only if it accounts for exactly the ``expected`` file paths.

    rc 0 or 4, no error message, ``failed`` 0, and every expected file either sent (a per-file
    line and the counter agree) or inspected and unchanged (an incremental of data already on
    tape).  The staging directory itself may be among the inspected objects.
    Raises TapeOutcomeError otherwise.
    """
    what = "archive" if verb == "archived" else "backup"
    _check_common(out, what)
    wanted = set(expected)
    counts = out.summary
    if counts.count("failed"):
        raise TapeOutcomeError(f"dsmc {what}: {counts.count('failed')} object(s) failed", out)
    sent = {o.path for o in out.objects if o.is_file and o.action != "Expiring"}
    stray = sent - wanted
    if stray:
        raise TapeOutcomeError(f"dsmc {what} sent objects outside the dataset: "
                               f"{sorted(stray)[0]}", out)
    dirs = sum(1 for o in out.objects if o.action == "Directory")
    moved = counts.count(verb) + counts.count("updated")
    inspected = counts.count("inspected")
    if verb == "archived" and "inspected" not in counts.counts:
        inspected = moved
    unchanged = inspected - moved - counts.count("failed")
    files_sent = moved - dirs
    if (sent or dirs) and files_sent != len(sent):  # no object lines at all: -quiet
        raise TapeOutcomeError(f"dsmc {what}: the summary counts {files_sent} file(s) sent but "
                               f"{len(sent)} were listed", out)
    accounted = files_sent + unchanged
    if accounted not in (len(wanted), len(wanted) + 1) or unchanged < 0:
        raise TapeOutcomeError(f"dsmc {what} accounted for {accounted} of {len(wanted)} file(s) "
                               f"({files_sent} sent, {unchanged} unchanged)", out)


def judge_restore(out: DsmcOutput, expected_files: int | None = None,
                  verb: str = "restored") -> None:
    """Accept a restore or retrieve only if rc, messages and counters all say it worked.

    Nothing on tape (ANS1092W, ANS1302E) is a failure: the data that was meant to be there is not.
    With ``expected_files``, the per-file lines must list that many files.
    Raises TapeOutcomeError otherwise.
    """
    what = "retrieve" if verb == "retrieved" else "restore"
    missing = [m for m in out.messages if m.code in NOTHING_FOUND]
    if missing:
        raise TapeOutcomeError(f"dsmc {what}: nothing on tape: {missing[0]}", out)
    _check_common(out, what)
    if out.summary.count("failed"):
        raise TapeOutcomeError(f"dsmc {what}: {out.summary.count('failed')} object(s) failed",
                               out)
    if not out.summary.count(verb):
        raise TapeOutcomeError(f"dsmc {what}: no objects {verb}", out)
    files = [o for o in out.objects if o.is_file and o.action in ("Restoring", "Retrieving")]
    if expected_files is not None and files and len(files) < expected_files:
        raise TapeOutcomeError(f"dsmc {what}: {len(files)} of {expected_files} file(s) "
                               "restored", out)
