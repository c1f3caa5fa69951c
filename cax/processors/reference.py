"""The reference processor: ``python -m cax.processors.reference INPUT OUTPUT [--ncpus N]``.

It stands in for pax in the demo and the tests.  It reads every file of a raw dataset (a
directory tree, or a single file) in blocks, treats each block as an "event", and writes a JSON
document of per-file and per-event summaries (size, adler32, byte sum, peak byte value and its
position, a 16-bin histogram of byte values): a real processed file whose content depends on
every byte of the input.  Nothing is written if the input cannot be read completely; the output
is written to ``OUTPUT`` directly (cax gives it a scratch name and renames it once verified).

``python -m cax.processors.reference --validate OUTPUT`` is its validator (the ``validate`` of
a processing section): it accepts only a complete document of this processor, with at least one
file and its events, and says what is wrong otherwise.

Exit codes: 0 success (or a valid output), 1 unreadable or empty input (or an invalid output),
2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from typing import Any

import click

EVENT_BYTES = 64 * 1024
BINS = 16


def _events(path: str) -> tuple[dict, list[dict]]:
    size, adler, events = 0, 1, []
    with open(path, "rb") as fh:
        while block := fh.read(EVENT_BYTES):
            adler = zlib.adler32(block, adler)
            histogram = [0] * BINS
            for value in range(256):
                count = block.count(value)
                if count:
                    histogram[value * BINS // 256] += count
            peak = max(block)
            events.append({"offset": size, "bytes": len(block), "sum": sum(block),
                           "peak": peak, "peak_at": size + block.index(peak),
                           "histogram": histogram})
            size += len(block)
    return {"size": size, "adler32": f"{adler & 0xFFFFFFFF:08x}", "events": len(events)}, events


def _files(root: str) -> list[str]:
    if os.path.isfile(root):
        return [root]
    found = []
    for top, dirs, names in os.walk(root):
        dirs.sort()
        found += [os.path.join(top, n) for n in sorted(names) if not n.startswith(".")]
    return found


def process(input_path: str, output_path: str, ncpus: int = 1) -> int:
    """Process ``input_path`` into ``output_path``; return the number of events."""
    files = _files(input_path)
    if not files:
        raise ValueError(f"{input_path}: no raw files")
    listed: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    for path in files:
        info, events = _events(path)
        rel = os.path.relpath(path, input_path) if path != input_path else "."
        listed.append({"path": rel, **info})
        found += [{"file": rel, **e} for e in events]
    summary = {"processor": "cax.processors.reference", "input": os.path.basename(
        input_path.rstrip("/")), "ncpus": ncpus, "files": listed, "events": found,
        "total_events": len(found)}
    with open(output_path, "w") as fh:
        json.dump(summary, fh, separators=(",", ":"))
        fh.write("\n")
    return len(found)


def validate(output_path: str) -> None:
    """Raise ValueError unless ``output_path`` is a complete output of this processor."""
    try:
        with open(output_path, "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{output_path}: not a processed document ({exc})") from None
    if not isinstance(doc, dict) or doc.get("processor") != "cax.processors.reference":
        raise ValueError(f"{output_path}: not written by the reference processor")
    files, events = doc.get("files"), doc.get("events")
    if not isinstance(files, list) or not files:
        raise ValueError(f"{output_path}: no input files recorded")
    if not isinstance(events, list) or doc.get("total_events") != len(events):
        raise ValueError(f"{output_path}: the event list is incomplete")
    if sum(f.get("events", 0) for f in files if isinstance(f, dict)) != len(events):
        raise ValueError(f"{output_path}: the files' events do not add up")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--validate"]:
        if len(argv) != 2:
            click.echo("usage: python -m cax.processors.reference --validate OUTPUT", err=True)
            return 2
        try:
            validate(argv[1])
        except (OSError, ValueError) as exc:
            click.echo(f"reference validator: {exc}", err=True)
            return 1
        click.echo(f"reference validator: {argv[1]}: valid")
        return 0
    parser = argparse.ArgumentParser(prog="python -m cax.processors.reference",
                                     description="Turn a raw dataset into a processed file.")
    parser.add_argument("input", help="raw dataset (directory or file)")
    parser.add_argument("output", help="processed file to write")
    parser.add_argument("--ncpus", type=int, default=1)
    opts = parser.parse_args(argv)
    try:
        events = process(opts.input, opts.output, opts.ncpus)
    except (OSError, ValueError) as exc:
        click.echo(f"reference processor: {exc}", err=True)
        return 1
    click.echo(f"reference processor: {opts.input} -> {opts.output}: {events} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
