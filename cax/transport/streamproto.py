"""The two ends of a streamed dataset copy: every file of a tree over one pipe, or over several.

Many small files cost rsync and scp a round trip (or several) each; here the sender lists the
tree once, the receiver answers once with what it already holds, and then all missing files
follow back to back, each a 24-byte header and its bytes.  The receiver computes the adler32
of every byte it writes and answers with the manifest of the whole copy, so the caller gets the
destination's checksums without reading it again.

Both ends are plain functions over binary file objects: ``cax.transport.stream`` runs one end
in-process and sends this file's source to the site (one-line bootstrap, source on stdin, see
``cax.transport.ssh.python_command``) to run the other.  This file must therefore stay
standard-library only and run on the oldest python3 a site may have (3.6): no ``from
__future__``, no subscripted builtin generics, no walrus.

One stream (request ``{"role": "receive"|"send", "path"}``; the site's end starts with it):
  sender -> receiver   listing line ``{"kind", "dirs": [[rel, mode, mtime_ns]], "files":
                       [[rel, size, mode, mtime_ns]]}`` (or ``{"error", "errno"}``)
  receiver -> sender   ``{"have": {rel: adler32}, "partial": {rel: [[hash, adler32]...]}}``:
                       complete files of an earlier attempt (size and mtime match), and the
                       RESUME_BLOCK blocks of the incomplete ones large enough to resume
  sender -> receiver   per item ``!qqq`` (index, offset, length) and the bytes; offset -1 is a
                       whole file written afresh, offset >= 0 a range written in place;
                       ``(-1, 0, 0)`` ends.  A file in ``have`` is skipped only if its adler32
                       matches the source's; a block in ``partial`` only if its hash does
  receiver -> sender   ``{"manifest": {rel: [size, adler32]}}`` (or ``{"error", "errno"}``)

Several streams (``cax.transport.lanes`` drives them, each over its own SSH connection):
``prepare`` (the receiver's answer above, for a put) or ``plan`` (the site lists, we answer,
the site replies ``{"items"}``: what it must send, for a get); then one ``receive-part`` or
``send-part`` per stream, each carrying some of the items (a large file in several ranges) and
answering ``{"files": {rel: [size, adler32]}, "ranges": {rel: [[offset, length, adler32]]}}``;
then ``complete`` gives the range-written files their mode and mtime once every range is there.
The adler32 of a file written in ranges is combined from its ranges' (``adler32_combine``),
each computed by the receiver from the bytes it wrote, and from its kept blocks' (read there).

A file gets the source's mtime only when complete, so an interrupted file never looks like a
complete one; a file whose size and mtime match is still skipped only if its adler32 matches
too.  An interrupted copy resumes with only the rest: the missing files, and of a large
half-copied file only the blocks whose hash differs from the source's (its verified prefix
stays).  Anything in the destination that is not in the listing is removed.  A file is written
under its own name (the whole copy is in a scratch directory until it is verified): a temp
name and a rename per file would double the directory operations, which dominate a copy of
many small files on a busy disk.  A file written in place is first made this tree's own inode
(an earlier attempt's tree may share it through hard links, see ``link_tree``).
"""

import errno
import fcntl
import hashlib
import json
import os
import queue
import select
import shutil
import stat
import struct
import sys
import threading
import zlib

BLOCK = 1 << 20
HEADER = struct.Struct("!qqq")
RESUME_BLOCK = 4 << 20
"""Granularity of resuming a half-copied file: blocks of this size whose hash matches the
source's stay.  Files smaller than it are sent again whole."""
ADLER_BASE = 65521
SMALL_FILE = 4 << 20  # files up to this size are read whole and written by a pool
WRITERS = 4
IN_FLIGHT = 16 << 20  # bytes read and not yet written, at most
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; named in Python 3.10


class StreamError(Exception):
    """The other end reported an error, or broke the protocol."""

    def __init__(self, message, code=None):
        Exception.__init__(self, message)
        self.errno = code


def _fs(path):
    return path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path


def _decoded(rel):
    return rel.decode("utf-8", "surrogateescape")


def _rel(root, path):
    return _decoded(os.path.relpath(path, root))


def _error_reply(exc):
    if isinstance(exc, OSError):
        where = exc.filename
        if isinstance(where, bytes):
            where = where.decode("utf-8", "backslashreplace")
        text = (exc.strerror or str(exc)) + (": " + str(where) if where is not None else "")
        return {"error": text, "errno": exc.errno}
    return {"error": f"{type(exc).__name__}: {exc}", "errno": None}


def grow_pipe(fileobj):
    """Give the pipe behind ``fileobj`` a 1 MiB buffer (64 KiB by default), if it is one:
    the sender keeps sending while the receiver creates a file.  Best effort."""
    try:
        fcntl.fcntl(fileobj.fileno(), F_SETPIPE_SZ, BLOCK)
    except (AttributeError, OSError, ValueError):
        pass  # not a pipe, not Linux, or over /proc/sys/fs/pipe-max-size


def send_line(wfile, obj):
    wfile.write(json.dumps(obj).encode("ascii") + b"\n")
    wfile.flush()


def read_line(rfile):
    """Read one JSON line; raise StreamError for an error reply or a closed stream."""
    line = rfile.readline()
    if not line.endswith(b"\n"):
        raise StreamError("the other end closed the stream")
    obj = json.loads(line.decode("utf-8"))
    if "error" in obj:
        raise StreamError(obj["error"], obj.get("errno"))
    return obj


def _hex(adler):
    return "%08x" % (adler & 0xFFFFFFFF)


def adler32_combine(adler1, adler2, len2):
    """Return the adler32 of A+B from those of A and B and B's length (zlib's
    adler32_combine, which Python's zlib does not expose)."""
    rem = len2 % ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % ADLER_BASE
    sum1 += (adler2 & 0xFFFF) + ADLER_BASE - 1
    sum2 += ((adler1 >> 16) & 0xFFFF) + ((adler2 >> 16) & 0xFFFF) + ADLER_BASE - rem
    if sum1 >= ADLER_BASE:
        sum1 -= ADLER_BASE
    if sum1 >= ADLER_BASE:
        sum1 -= ADLER_BASE
    if sum2 >= ADLER_BASE << 1:
        sum2 -= ADLER_BASE << 1
    if sum2 >= ADLER_BASE:
        sum2 -= ADLER_BASE
    return sum1 | (sum2 << 16)


def combine(rel, size, pieces):
    """Return the adler32 (hex) of a file from ``pieces`` [offset, length, adler32 hex] that
    must tile it exactly; raise StreamError if a byte is missing or written twice."""
    adler, pos = 1, 0
    for offset, length, piece in sorted(pieces):
        if not length:
            continue
        if offset != pos:
            raise StreamError(f"not every byte of {rel} was written (at {pos}, {offset})")
        adler = adler32_combine(adler, int(piece, 16), length)
        pos += length
    if pos != size:
        raise StreamError(f"not every byte of {rel} was written ({pos} of {size})")
    return _hex(adler)


def _block_sums(path, count):
    """Return [hash, adler32] of the first ``count`` RESUME_BLOCK blocks of ``path``."""
    sums = []
    with open(path, "rb", buffering=0) as f:
        for _ in range(count):
            data = f.read(RESUME_BLOCK)
            if len(data) != RESUME_BLOCK:
                break
            sums.append([hashlib.blake2b(data, digest_size=16).hexdigest(),
                         _hex(zlib.adler32(data))])
    return sums


def adler32_of(path):
    adler = 1
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                return _hex(adler)
            adler = zlib.adler32(view[:n], adler)


# ---------------------------------------------------------------- sender


def list_tree(root):
    """Return the listing of the dataset at ``root`` (a directory tree or one file).

    Directories top-down, each directory's files and subdirectories by name: one lstat per
    entry (through scandir), no path normalisation, since listing 1,000 files is on the
    critical path of every streamed copy.
    """
    root = _fs(root)
    info = os.stat(root)
    if not stat.S_ISDIR(info.st_mode):
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", root)
        return {"kind": "file", "dirs": [],
                "files": [[".", info.st_size, stat.S_IMODE(info.st_mode), info.st_mtime_ns]]}
    dirs, files = [], []
    todo = [(root, b"", os.lstat(root))]
    while todo:
        top, rel, dinfo = todo.pop()
        dirs.append([_decoded(rel) or ".", stat.S_IMODE(dinfo.st_mode), dinfo.st_mtime_ns])
        with os.scandir(top) as entries:
            found = sorted((entry.name, entry.path, entry.stat(follow_symlinks=False))
                           for entry in entries)
        subdirs = []
        for name, path, finfo in found:
            name = rel + b"/" + name if rel else name
            if stat.S_ISDIR(finfo.st_mode):
                subdirs.append((path, name, finfo))
            elif stat.S_ISREG(finfo.st_mode):
                files.append([_decoded(name), finfo.st_size, stat.S_IMODE(finfo.st_mode),
                              finfo.st_mtime_ns])
            else:
                raise OSError(errno.EINVAL, "symlink or special file in dataset", path)
        todo.extend(reversed(subdirs))
    return {"kind": "dir", "dirs": dirs, "files": files}


def _raise(exc):
    raise exc


def _sendfile(out_fd, path, offset, length, progress):
    """Send ``length`` bytes of ``path`` from ``offset`` to ``out_fd`` (zero-copy)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        end = offset + length
        while offset < end:
            n = os.sendfile(out_fd, fd, offset, min(BLOCK, end - offset))
            if n == 0:
                raise OSError(errno.EIO, "file shrank while it was sent", path)
            offset += n
            progress(n)
    finally:
        os.close(fd)


def _path(root, rel):
    return root if rel == "." else os.path.join(root, _fs(rel))


def plan(root, listing, have, partial, progress=None):
    """Return the items the sender must send: ``[index, offset, length, splittable]``.

    A file the receiver holds complete is skipped if its adler32 matches; of a half-copied
    file (``partial``) only the blocks whose hash differs, and the tail, are sent as ranges.
    Offset -1 is a whole file written afresh; ``splittable`` says it may be cut into ranges
    written in place (not a file that exists complete at the receiver: its inode may be an
    earlier tree's too).
    """
    progress = progress or (lambda n: None)
    root = _fs(root)
    items = []
    for index, (rel, size, _mode, _mtime) in enumerate(listing["files"]):
        path = _path(root, rel)
        if rel in have:
            if adler32_of(path) == have[rel]:
                progress(0)
            else:
                items.append([index, -1, size, False])
            continue
        blocks = partial.get(rel)
        if not blocks:
            items.append([index, -1, size, True])
            continue
        kept = _block_sums(path, len(blocks))
        start = None
        for k, (digest, _adler) in enumerate(blocks):
            same = k < len(kept) and kept[k][0] == digest
            if not same and start is None:
                start = k * RESUME_BLOCK
            elif same and start is not None:
                items.append([index, start, k * RESUME_BLOCK - start, True])
                start = None
        tail = len(blocks) * RESUME_BLOCK
        if start is not None:
            items.append([index, start, size - start, True])
        elif size > tail:
            items.append([index, tail, size - tail, True])
    return items


def send_items(root, listing, items, wfile, progress=None):
    """Send ``items`` ([index, offset, length, ...]) and the end mark; ``wfile`` must have a
    real file descriptor (a pipe): file bytes go to it with sendfile."""
    progress = progress or (lambda n: None)
    root = _fs(root)
    out_fd = wfile.fileno()
    files = listing["files"]
    for item in items:
        index, offset, length = item[0], item[1], item[2]
        os.write(out_fd, HEADER.pack(index, offset, length))
        _sendfile(out_fd, _path(root, files[index][0]), max(offset, 0), length, progress)
    os.write(out_fd, HEADER.pack(-1, 0, 0))


def _offer(root, rfile, wfile, listing=None):
    """Send the listing of ``root`` (made here unless given; the error, if it cannot be
    listed) and return it with the receiver's answer."""
    if listing is None:
        try:
            listing = list_tree(root)
        except OSError as exc:
            send_line(wfile, _error_reply(exc))
            raise
    send_line(wfile, listing)
    return listing, read_line(rfile)


def send(root, rfile, wfile, progress=None, listing=None):
    """Be the sending end of one stream for the dataset at ``root``; return the receiver's
    manifest."""
    progress = progress or (lambda n: None)
    listing, reply = _offer(root, rfile, wfile, listing)
    items = plan(root, listing, reply["have"], reply.get("partial", {}), progress)
    send_items(root, listing, items, wfile, progress)
    return read_line(rfile)["manifest"]


def send_part(root, listing, items, rfile, wfile, progress=None):
    """Be the sending end of one of several streams: send ``items``; return the receiver's
    answer ``{"files", "ranges"}``."""
    send_items(root, listing, items, wfile, progress)
    return read_line(rfile)


# ---------------------------------------------------------------- receiver


def _kind(path):
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    return "dir" if stat.S_ISDIR(mode) else ("file" if stat.S_ISREG(mode) else "other")


def _remove(path):
    if _kind(path) == "dir":
        shutil.rmtree(path)
    elif _kind(path) != "missing":
        os.unlink(path)


def _own(path, info, size):
    """Make ``path`` an inode of this tree alone, at most ``size`` bytes long, before it is
    written in place: an earlier attempt's tree may share it (hard links)."""
    if info.st_nlink > 1:
        temp = path + b".cax-own"
        with open(path, "rb") as old:
            fd = _create(temp)
            try:
                with os.fdopen(os.dup(fd), "wb") as new:
                    shutil.copyfileobj(old, new, BLOCK)
            finally:
                os.close(fd)
        os.rename(temp, path)
    if info.st_size > size:
        os.truncate(path, size)


def _resumable(path, info, size):
    """Return the block sums of an incomplete file worth resuming, after making it ours; else
    remove it (it is sent again whole) and return None."""
    if min(info.st_size, size) < RESUME_BLOCK:
        os.unlink(path)
        return None
    _own(path, info, size)
    return _block_sums(path, min(info.st_size, size) // RESUME_BLOCK)


def _prepare(dest, listing):
    """Make ``dest`` ready for ``listing``; return ``(have, partial)``: {rel: adler32} of files
    already complete, {rel: [[hash, adler32]]} of the blocks of half-copied ones."""
    parent = os.path.dirname(dest.rstrip(b"/")) or b"/"
    if _kind(parent) != "dir":
        os.makedirs(parent, exist_ok=True)
    want = listing["kind"]
    if _kind(dest) not in ("missing", want):
        _remove(dest)
    files = dict((rel, (size, mtime)) for rel, size, _mode, mtime in listing["files"])
    have, partial = {}, {}

    def check(rel, path, info):
        if (info.st_size, info.st_mtime_ns) == files[rel]:
            have[rel] = adler32_of(path)
        else:
            blocks = _resumable(path, info, files[rel][0])
            if blocks:
                partial[rel] = blocks

    if want == "file":
        if _kind(dest) == "file":
            check(".", dest, os.lstat(dest))
        return have, partial
    dirs = set(rel for rel, _mode, _mtime in listing["dirs"])
    if _kind(dest) == "missing":
        os.mkdir(dest, 0o700)
    for top, subdirs, names in os.walk(dest, onerror=_raise):
        for name in list(subdirs):
            path = os.path.join(top, name)
            if _rel(dest, path) not in dirs or os.path.islink(path):
                _remove(path)
                subdirs.remove(name)
        for name in names:
            path = os.path.join(top, name)
            rel = _rel(dest, path)
            info = os.lstat(path)
            if rel not in files or not stat.S_ISREG(info.st_mode):
                os.unlink(path)  # not in the source, a temp file or not a regular file
            else:
                check(rel, path, info)
    for rel, _mode, _mtime in listing["dirs"]:
        if rel != ".":
            os.makedirs(os.path.join(dest, _fs(rel)), 0o700, exist_ok=True)
    return have, partial


def _peer_gone(fd):
    """Return whether the reader of ``fd`` (our reply pipe) went away: the copy was cut off."""
    if fd is None:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))


def _create(path):
    """Open a new file at ``path``; an earlier attempt's file there is unlinked first, so a
    write never goes into an inode another tree shares (hard links)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, 0o600)


def _check_sender(reply_fd):
    """Raise if the sender went away (an abort): what is still in the pipe is not written."""
    if _peer_gone(reply_fd):
        raise StreamError("the sender went away")


def _write_all(fd, view):
    while view:
        view = view[os.write(fd, view):]


def _complete(fd, mode, mtime_ns):
    """Give a fully written file its mode and the source's mtime (the mark of completeness)."""
    os.fchmod(fd, mode)
    os.utime(fd, ns=(mtime_ns, mtime_ns))


def _chunks(rfile, buf, length, reply_fd):
    """Yield the next ``length`` bytes of ``rfile`` as they come, in views of ``buf`` (each
    valid until the next is asked for)."""
    view = memoryview(buf)
    left = length
    while left:
        n = rfile.readinto(view[:min(left, len(buf))])
        if not n:
            raise StreamError("the stream ended in the middle of a file")
        _check_sender(reply_fd)
        yield view[:n]
        left -= n


def _receive_file(rfile, path, size, mode, mtime_ns, buf, progress, reply_fd=None):
    """Write ``size`` bytes from ``rfile`` to ``path`` as they come; return their adler32."""
    adler = 1
    fd = _create(path)
    try:
        for chunk in _chunks(rfile, buf, size, reply_fd):
            adler = zlib.adler32(chunk, adler)
            _write_all(fd, chunk)
            progress(len(chunk))
        _complete(fd, mode, mtime_ns)
    finally:
        os.close(fd)
    return _hex(adler)


def _receive_range(rfile, path, offset, length, buf, progress, reply_fd=None):
    """Write ``length`` bytes from ``rfile`` into ``path`` at ``offset`` (the file is created
    if no other range did yet); return their adler32.  Not complete: see ``complete``."""
    adler = 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        for chunk in _chunks(rfile, buf, length, reply_fd):
            adler = zlib.adler32(chunk, adler)
            done, n = 0, len(chunk)
            while done < n:
                done += os.pwrite(fd, chunk[done:], offset + done)
            offset += n
            progress(n)
    finally:
        os.close(fd)
    return _hex(adler)


def _read_file(rfile, size, progress):
    """Read the ``size`` bytes of one (small) file from the stream into memory."""
    data = rfile.read(size)
    if len(data) != size:
        raise StreamError("the stream ended in the middle of a file")
    progress(size)
    return data


class _Writers:
    """Write small files on a few threads while the stream is read.

    On a busy disk, creating and writing a small file is mostly waiting (for the journal),
    and several files can wait at once: right after as many files were deleted, four writers
    took 1,000 files of 100 kB in 0.55 to 0.75 of the time one took (bench/filecreate.py).
    At most ``budget`` bytes are read and not yet written; after a failure, or once the sender
    went away (an abort), no further file is started.
    """

    def __init__(self, count, budget, reply_fd):
        self.reply_fd = reply_fd
        self.budget, self.held = budget, 0
        self.room = threading.Condition()
        self.todo: queue.Queue = queue.Queue()
        self.written = {}  # rel: [size, adler32]
        self.failed = None
        self.threads = [threading.Thread(target=self._run, name="cax-stream-writer",
                                         daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, rel, path, data, mode, mtime_ns):
        with self.room:
            while self.held and self.held + len(data) > self.budget and not self.failed:
                self.room.wait()
            if self.failed:
                raise self.failed
            self.held += len(data)
        self.todo.put((rel, path, data, mode, mtime_ns))

    def _run(self):
        while True:
            job = self.todo.get()
            if job is None:
                return
            rel, path, data, mode, mtime_ns = job
            try:
                if not self.failed:
                    self.written[rel] = [len(data), self._write(path, data, mode, mtime_ns)]
            except BaseException as exc:  # handed to the reading thread
                self.failed = self.failed or exc
            finally:
                with self.room:
                    self.held -= len(data)
                    self.room.notify_all()

    def _write(self, path, data, mode, mtime_ns):
        _check_sender(self.reply_fd)
        fd = _create(path)
        try:
            _write_all(fd, memoryview(data))
            _complete(fd, mode, mtime_ns)
        finally:
            os.close(fd)
        return _hex(zlib.adler32(data))

    def _join(self):
        for _ in self.threads:
            self.todo.put(None)
        for thread in self.threads:
            thread.join()

    def finish(self):
        """Wait for every file; return their manifest entries, or raise the first failure."""
        self._join()
        if self.failed:
            raise self.failed
        return self.written

    def stop(self):
        """No new file; wait for those being written."""
        self.failed = self.failed or StreamError("stopped")
        with self.room:
            self.room.notify_all()
        self._join()


def _reply_fd(wfile):
    try:
        return wfile.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def receive_items(dest, listing, rfile, reply_fd=None, progress=None):
    """Write the items that follow on ``rfile`` up to the end mark; return ``(files,
    ranges)``: {rel: [size, adler32]} of whole files written (and complete), {rel: [[offset,
    length, adler32]]} of ranges written in place."""
    progress = progress or (lambda n: None)
    dest = _fs(dest)
    files = listing["files"]
    ranges: dict = {}
    written = {}
    buf = bytearray(BLOCK)
    writers = _Writers(WRITERS, IN_FLIGHT, reply_fd)
    try:
        while True:
            index, offset, length = HEADER.unpack(_read_exact(rfile, HEADER.size))
            if index < 0:
                break
            rel, size, mode, mtime = files[index]
            path = _path(dest, rel)
            if offset >= 0:
                if offset + length > size:
                    raise StreamError(f"{rel} changed size while it was copied")
                adler = _receive_range(rfile, path, offset, length, buf, progress, reply_fd)
                ranges.setdefault(rel, []).append([offset, length, adler])
                continue
            if length != size:
                raise StreamError(f"{rel} changed size while it was copied")
            if size <= SMALL_FILE:
                writers.submit(rel, path, _read_file(rfile, size, progress), mode, mtime)
            else:
                written[rel] = [size, _receive_file(rfile, path, size, mode, mtime, buf,
                                                    progress, reply_fd)]
        written.update(writers.finish())
    except BaseException:
        writers.stop()
        raise
    return written, ranges


def _kept(blocks, written):
    """Return the pieces [offset, length, adler32] of ``blocks`` (a half-copied file's resume
    blocks) that no written range overlaps: the ones the sender found equal and kept."""
    kept = []
    for k, (_digest, adler) in enumerate(blocks):
        start, end = k * RESUME_BLOCK, (k + 1) * RESUME_BLOCK
        if not any(off < end and start < off + length for off, length, _a in written):
            kept.append([start, RESUME_BLOCK, adler])
    return kept


def assemble(listing, have, partial, written, ranges):
    """Return ``(manifest, to_complete)``: every listed file's [size, adler32], from what was
    written whole, in ranges (combined with the blocks kept), or held complete already; and
    the files written in place that ``complete`` must finish.  Raise StreamError if a file or
    a byte of one is missing."""
    manifest, to_complete = {}, []
    for rel, size, _mode, _mtime in listing["files"]:
        if rel in written:
            manifest[rel] = list(written[rel])
        elif rel in ranges or rel in partial:
            pieces = ranges.get(rel, [])
            pieces = pieces + _kept(partial.get(rel, []), pieces)
            manifest[rel] = [size, combine(rel, size, pieces)]
            to_complete.append(rel)
        elif rel in have:
            manifest[rel] = [size, have[rel]]
        else:
            raise StreamError("the sender left out " + rel)
    return manifest, to_complete


def complete(dest, listing, rels):
    """Give the files ``rels`` (written in ranges, every range there) and then every directory
    their mode and the source's mtime, the mark of completeness."""
    dest = _fs(dest)
    files = dict((rel, (size, mode, mtime)) for rel, size, mode, mtime in listing["files"])
    for rel in rels:
        size, mode, mtime = files[rel]
        fd = os.open(_path(dest, rel), os.O_WRONLY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size != size:
                raise StreamError(f"{rel} is {os.fstat(fd).st_size} bytes, not {size}")
            _complete(fd, mode, mtime)
        finally:
            os.close(fd)
    for rel, mode, mtime in reversed(listing["dirs"]):  # children first
        path = _path(dest, rel)
        os.chmod(path, mode)
        os.utime(path, ns=(mtime, mtime))


def _answering(wfile, work):
    """Run ``work()``; on a failure send the error line before it propagates."""
    try:
        return work()
    except (OSError, StreamError) as exc:
        try:
            send_line(wfile, _error_reply(exc))
        except OSError:
            pass
        raise


def prepare(dest, rfile, wfile):
    """Read the listing, make ``dest`` ready, answer what is there; return (listing, have,
    partial)."""
    listing = read_line(rfile)
    have, partial = _answering(wfile, lambda: _prepare(_fs(dest), listing))
    send_line(wfile, {"have": have, "partial": partial})
    return listing, have, partial


def receive(dest, rfile, wfile, progress=None):
    """Be the receiving end of one stream writing the dataset at ``dest``; return its manifest.

    Errors on this side are sent to the sender as an error line before they propagate.
    """
    listing, have, partial = prepare(dest, rfile, wfile)

    def work():
        written, ranges = receive_items(dest, listing, rfile, _reply_fd(wfile), progress)
        manifest, to_complete = assemble(listing, have, partial, written, ranges)
        complete(dest, listing, to_complete)
        return manifest

    manifest = _answering(wfile, work)
    send_line(wfile, {"manifest": manifest})
    return manifest


def receive_part(dest, listing, rfile, wfile, progress=None):
    """Be the receiving end of one of several streams; return and answer ``{"files",
    "ranges"}`` of what it wrote."""
    written, ranges = _answering(wfile, lambda: receive_items(
        dest, listing, rfile, _reply_fd(wfile), progress))
    answer = {"files": written, "ranges": ranges}
    send_line(wfile, answer)
    return answer


def _read_exact(rfile, n):
    data = rfile.read(n)
    if len(data) != n:
        raise StreamError("the stream ended unexpectedly")
    return data


def _site(request, rfile, wfile):
    """The site's end of each request (see the module docstring)."""
    role, path = request["role"], request["path"]
    if role == "receive":
        receive(path, rfile, wfile)
    elif role == "send":
        send(path, rfile, wfile)
    elif role == "prepare":
        prepare(path, rfile, wfile)
    elif role == "plan":
        listing, reply = _offer(path, rfile, wfile)
        send_line(wfile, {"items": _answering(wfile, lambda: plan(
            path, listing, reply["have"], reply["partial"]))})
    elif role == "receive-part":
        receive_part(path, read_line(rfile), rfile, wfile)
    elif role == "send-part":
        send_part(path, read_line(rfile), request["items"], rfile, wfile)
    elif role == "complete":
        listing = read_line(rfile)
        _answering(wfile, lambda: complete(path, listing, request["rels"]))
        send_line(wfile, {"done": True})
    elif role == "echo":  # the round trip, measured by the caller
        for line in iter(rfile.readline, b""):
            wfile.write(line)
            wfile.flush()
    else:
        raise StreamError(f"unknown role {role!r}")


def main():
    """The site's end: one request line on stdin, then the protocol on stdin/stdout."""
    rfile, wfile = sys.stdin.buffer, sys.stdout.buffer
    grow_pipe(rfile)
    grow_pipe(wfile)
    try:
        _site(json.loads(rfile.readline().decode("utf-8")), rfile, wfile)
    except (OSError, StreamError) as exc:
        sys.stderr.write(f"cax stream: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
