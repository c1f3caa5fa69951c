#!/usr/bin/env python3
"""A stand-in for IBM Spectrum Protect's ``dsmc``: keeps "tape" in a folder, prints the real
client's documented output formats, and fails on demand.

The tests install it as ``dsmc`` in a temporary bin directory on PATH.  ``$FAKE_DSMC_TAPE`` is
the tape folder: objects live under ``store/<absolute path>``, every call is appended to
``calls.log`` (one JSON argv per line), bytes the client read from the site's disk (backups)
are added up in ``reads``, bytes read from tape (restores) in ``tape_reads``.
``control.json`` there (re-read on every call) switches failure modes per command
(``{"modes": {"*": [...], "restore": [...]}, "sep": "."}``):

``reject``   ANS1017E session rejected, rc 12       ``skip``     one file silently skipped, rc 4
``warn``     an ANSnnnnW warning, rc 8               ``hang``     banner, then sleeps for ever
``prompt``   asks for a password and waits on stdin  ``corrupt``  restore flips one byte
``nothing``  backup reports success, stores nothing  ``garbage``  a summary it cannot parse
``sep``      thousands separator of counters: "," (default), "." or " " (decimals then ",")
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

NOW = time.strftime("%m/%d/%Y %H:%M:%S")


def tape() -> str:
    return os.environ["FAKE_DSMC_TAPE"]


def control() -> dict:
    try:
        with open(os.path.join(tape(), "control.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def modes(command: str) -> set:
    table = control().get("modes", {})
    return set(table.get("*", [])) | set(table.get(command, []))


def sep() -> str:
    return control().get("sep", ",")


def grouped(n: int) -> str:
    return f"{n:,}".replace(",", sep())


def decimal(x: float) -> str:
    text = f"{x:,.2f}"
    if sep() == ",":
        return text
    whole, frac = text.split(".")
    return whole.replace(",", sep()) + "," + frac


def human(nbytes: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= size:
            return f"{decimal(nbytes / size)} {unit}"
    return f"{decimal(float(nbytes))}  B"


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def add_reads(nbytes: int, name: str = "reads") -> None:
    path = os.path.join(tape(), name)
    try:
        with open(path) as f:
            total = int(f.read() or 0)
    except FileNotFoundError:
        total = 0
    with open(path, "w") as f:
        f.write(str(total + nbytes))


def copy(src: str, dst: str, local_read: bool) -> int:
    """Copy one object; ``local_read``: the client read it from the site's disk (a backup),
    not from tape (a restore), and it counts in ``reads``."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)
    size = os.path.getsize(src)
    add_reads(size, "reads" if local_read else "tape_reads")
    return size


def stored(path: str) -> str:
    return os.path.join(tape(), "store", path.strip("/"))


def banner(argv_modes: set) -> None:
    out("IBM Spectrum Protect")
    out("Command Line Backup-Archive Client Interface")
    out("  Client Version 8, Release 1, Level 10.0")
    out(f"  Client date/time: {NOW}")
    out("(c) Copyright by IBM Corporation and other(s) 1990, 2020. All Rights Reserved.")
    out("")
    if "prompt" in argv_modes:
        sys.stdout.write('Please enter password for node "XE1T": ')
        sys.stdout.flush()
        if not sys.stdin.readline():
            time.sleep(3600)  # the real client keeps waiting for an answer
    out("Node Name: XE1T")
    if "reject" in argv_modes:
        out("ANS1017E Session rejected: TCP/IP connection failure.")
        sys.exit(12)
    out("Session established with server TSM1: Linux/x86_64")
    out("  Server Version 8, Release 1, Level 9.100")
    out(f"  Server date/time: {NOW}  Last access: {NOW}")
    out("")
    if "hang" in argv_modes:
        time.sleep(3600)


def summary(counts: list, nbytes_inspected: int | None, nbytes: int, seconds: float) -> None:
    out("")
    for label, value in counts:
        out(f"Total number of {label + ':':<28}{grouped(value):>12}")
    if "garbage" in modes_now:
        out("Total number of objects failed:   many")
    if nbytes_inspected is not None:
        out(f"Total number of bytes inspected:    {human(nbytes_inspected):>14}")
    out(f"Total number of bytes transferred:  {human(nbytes):>14}")
    rate = nbytes / 1024 / max(seconds, 0.01)
    out(f"Data transfer time:                 {decimal(seconds):>10} sec")
    out(f"Network data transfer rate:         {decimal(rate):>14} KB/sec")
    out(f"Aggregate data transfer rate:       {decimal(rate / 2):>14} KB/sec")
    if nbytes_inspected is not None:
        out("Objects compressed by:                        0%")
        out("Total data reduction ratio:               0.00%")
    out(f"Elapsed processing time:              00:00:{int(seconds) % 60:02d}")


def files_of(directory: str) -> list:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)]
    return found


def backup(args: list, archive: bool) -> int:
    directory = args[0].rstrip("/")
    files = files_of(directory)
    rc = 0
    if "skip" in modes_now and files:
        files = files[:-1]
        rc = 4
    if "warn" in modes_now:
        out(f"ANS1115W File '{directory}/.hidden' excluded by Include/Exclude processing.")
        rc = 8
    sent, inspected_bytes, sent_bytes, dirs_sent = 0, 0, 0, 0
    if not archive:
        out(f"Incremental backup of volume '{directory}/'")
    else:
        out("Archive function invoked.")
        out("")
    if not os.path.exists(stored(directory)) or archive:
        out(f"Directory-->{grouped(4096):>20} {directory} [Sent]")
        dirs_sent = 1
        if "nothing" not in modes_now:
            os.makedirs(stored(directory), exist_ok=True)
    start = time.monotonic()
    for path in files:
        size = os.path.getsize(path)
        inspected_bytes += size
        target = stored(path)
        if not archive and os.path.exists(target) and \
                os.stat(target).st_mtime == os.stat(path).st_mtime and \
                os.path.getsize(target) == size:
            continue
        if "nothing" in modes_now:
            add_reads(size)
        else:
            copy(path, target, local_read=True)
        label = "Archiving" if archive else "Normal File"
        out(f"{label}-->{grouped(size):>20} {path} [Sent]")
        sent += 1
        sent_bytes += size
    if not archive:
        out(f"Successful incremental backup of '{directory}/*'")
    counts = [("objects inspected", len(files) + 1)] if not archive else []
    counts += [("objects archived" if archive else "objects backed up", sent + dirs_sent)]
    if not archive:
        counts += [("objects updated", 0), ("objects rebound", 0), ("objects deleted", 0),
                   ("objects expired", 0)]
    counts += [("objects failed", 0)]
    if not archive:
        counts += [("objects encrypted", 0), ("objects grew", 0)]
    counts += [("retries", 0)]
    summary(counts, inspected_bytes, sent_bytes, time.monotonic() - start)
    return rc


def restore(args: list) -> int:
    source, dest = args[0].rstrip("/"), args[1].rstrip("/")
    replace = any(a in ("-replace=yes", "-replace=all") for a in options)
    found = files_of(stored(source))
    out("Restore function invoked.")
    out("")
    if not found:
        out("ANS1302E No objects on server match query")
        return 12
    start, total, restored = time.monotonic(), 0, 0
    base = os.path.join(dest, os.path.basename(source))
    out(f"Restoring{grouped(4096):>20} {source} --> {base} [Done]")
    corrupt = "corrupt" in modes_now
    for path in found:
        rel = os.path.relpath(path, stored(source))
        target = os.path.join(base, rel)
        if os.path.exists(target) and not replace:
            out("--- User Action is Required ---")
            out(f"File '{target}' exists")
            sys.stdout.write("Action [1,2,3,4,A,N,Q] : ")
            sys.stdout.flush()
            if not sys.stdin.readline():
                time.sleep(3600)
        size = copy(path, target, local_read=False)
        if corrupt and size:
            with open(target, "r+b") as f:
                byte = f.read(1)
                f.seek(0)
                f.write(bytes([byte[0] ^ 0xFF]))
            corrupt = False
        out(f"Restoring{grouped(size):>20} {os.path.join(source, rel)} --> {target} [Done]")
        total += size
        restored += 1
    out("")
    out("Restore processing finished.")
    verb = "retrieved" if command == "retrieve" else "restored"
    summary([(f"objects {verb}", restored + 1), ("objects failed", 0)], None, total,
            time.monotonic() - start)
    return 0


def query(args: list) -> int:
    if args and args[0] == "session":
        out("Server Name.........: TSM1")
        return 0
    spec = args[1].rstrip("*").rstrip("/") if len(args) > 1 else "/"
    found = files_of(stored(spec))
    if not found:
        out("ANS1092W No files matching search criteria were found")
        return 8
    out("  Size        Backup Date                Mgmt Class           A/I File")
    out("  ----        -----------                ----------           --- ----")
    for path in found:
        original = "/" + os.path.relpath(path, os.path.join(tape(), "store"))
        out(f"{grouped(os.path.getsize(path)):>12}  B  {NOW}    STANDARD             A  "
            f"{original}")
    return 0


def main() -> int:
    global modes_now, options, command
    argv = sys.argv[1:]
    os.makedirs(tape(), exist_ok=True)
    with open(os.path.join(tape(), "calls.log"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    command = {"incr": "incremental", "i": "incremental", "rest": "restore", "q": "query",
               "ar": "archive", "ret": "retrieve"}.get(argv[0] if argv else "", argv[0] if argv
                                                     else "")
    args = [a for a in argv[1:] if not a.startswith("-")]
    options = [a for a in argv[1:] if a.startswith("-")]
    modes_now = modes(command)
    banner(modes_now)
    if command == "incremental":
        return backup(args, archive=False)
    if command == "archive":
        return backup(args, archive=True)
    if command in ("restore", "retrieve"):
        return restore(args)
    if command == "query":
        return query(args)
    out(f"ANS1138E The '{command}' command must be followed by a subcommand")
    return 12


modes_now: set = set()
options: list = []
command = ""

if __name__ == "__main__":
    sys.exit(main())
