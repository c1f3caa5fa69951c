"""The two ends of a streamed dataset copy: every file of a tree over one pipe, one stream.

Many small files cost rsync and scp a round trip (or several) each; here the sender lists the
tree once, the receiver answers once with what it already holds, and then all missing files
follow back to back, each a 16-byte header and its bytes.  The receiver computes every file's
adler32 from the bytes as it writes them and answers with the manifest of the whole copy, so
the caller gets the destination's checksums without reading it again.

Both ends are plain functions over binary file objects: ``cax.transport.stream`` runs one end
in-process and sends this file's source to the site (one-line bootstrap, source on stdin, see
``cax.transport.ssh.python_command``) to run the other.  This file must therefore stay
standard-library only and run on the oldest python3 a site may have (3.6): no ``from
__future__``, no subscripted builtin generics, no walrus.

Protocol (the site's end starts with one request line, ``{"role": "receive"|"send", "path"}``):
  sender -> receiver   listing line ``{"kind", "dirs": [[rel, mode, mtime_ns]], "files":
                       [[rel, size, mode, mtime_ns]]}`` (or ``{"error", "errno"}``)
  receiver -> sender   ``{"have": {rel: adler32}}``: complete files of an earlier attempt whose
                       size and mtime match (or ``{"error", "errno"}``)
  sender -> receiver   per file to send: ``!qq`` (index, size) and the bytes; ``(-1, 0)`` ends.
                       A file in ``have`` is skipped only if its adler32 matches the source's.
  receiver -> sender   ``{"manifest": {rel: [size, adler32]}}`` (or ``{"error", "errno"}``)
A file is written under its own name (the whole copy is in a scratch directory until it is
verified) and gets the source's mtime only when complete, so an interrupted file never looks
like a complete one; a file whose size and mtime match is still skipped only if its adler32
matches too.  An interrupted copy resumes with only the rest.  Anything in the destination that
is not in the listing is removed.  A temp name and a rename per file would double the
directory operations, which dominate a copy of many small files on a busy disk.
"""

import errno
import fcntl
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
HEADER = struct.Struct("!qq")
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
    return {"error": "%s: %s" % (type(exc).__name__, exc), "errno": None}


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


def _sendfile(out_fd, path, size, progress):
    """Send exactly ``size`` bytes of ``path`` to ``out_fd`` (zero-copy where possible)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        offset = 0
        while offset < size:
            n = os.sendfile(out_fd, fd, offset, min(BLOCK, size - offset))
            if n == 0:
                raise OSError(errno.EIO, "file shrank while it was sent", path)
            offset += n
            progress(n)
    finally:
        os.close(fd)


def send(root, rfile, wfile, progress=None, listing=None):
    """Be the sending end for the dataset at ``root``; return the receiver's manifest.

    ``wfile`` must have a real file descriptor (a pipe): file bytes go to it with sendfile.
    """
    progress = progress or (lambda n: None)
    root = _fs(root)
    if listing is None:
        try:
            listing = list_tree(root)
        except OSError as exc:
            send_line(wfile, _error_reply(exc))
            raise
    send_line(wfile, listing)
    have = read_line(rfile)["have"]
    out_fd = wfile.fileno()
    for index, (rel, size, _mode, _mtime) in enumerate(listing["files"]):
        path = root if rel == "." else os.path.join(root, _fs(rel))
        if rel in have and adler32_of(path) == have[rel]:
            progress(0)
            continue
        os.write(out_fd, HEADER.pack(index, size))
        _sendfile(out_fd, path, size, progress)
    os.write(out_fd, HEADER.pack(-1, 0))
    return read_line(rfile)["manifest"]


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


def _prepare(dest, listing):
    """Make ``dest`` ready for ``listing``; return {rel: adler32} of files already complete."""
    parent = os.path.dirname(dest.rstrip(b"/")) or b"/"
    if _kind(parent) != "dir":
        os.makedirs(parent, exist_ok=True)
    want = listing["kind"]
    if _kind(dest) not in ("missing", want):
        _remove(dest)
    files = dict((rel, (size, mtime)) for rel, size, _mode, mtime in listing["files"])
    have = {}
    if want == "file":
        if _kind(dest) == "file":
            info = os.lstat(dest)
            if (info.st_size, info.st_mtime_ns) == files["."]:
                have["."] = adler32_of(dest)
        return have
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
            elif (info.st_size, info.st_mtime_ns) == files[rel]:
                have[rel] = adler32_of(path)
    for rel, _mode, _mtime in listing["dirs"]:
        if rel != ".":
            os.makedirs(os.path.join(dest, _fs(rel)), 0o700, exist_ok=True)
    return have


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


def _receive_file(rfile, path, size, mode, mtime_ns, buf, progress, reply_fd=None):
    """Write ``size`` bytes from ``rfile`` to ``path`` as they come; return their adler32."""
    view = memoryview(buf)
    adler, left = 1, size
    fd = _create(path)
    try:
        while left:
            n = rfile.readinto(view[:min(left, len(buf))])
            if not n:
                raise StreamError("the stream ended in the middle of a file")
            _check_sender(reply_fd)
            chunk = view[:n]
            adler = zlib.adler32(chunk, adler)
            _write_all(fd, chunk)
            left -= n
            progress(n)
        _complete(fd, mode, mtime_ns)
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


class _Writers(object):
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
        self.todo = queue.Queue()
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


def receive(dest, rfile, wfile, progress=None):
    """Be the receiving end writing the dataset at ``dest``; return its manifest.

    Errors on this side are sent to the sender as an error line before they propagate.
    """
    progress = progress or (lambda n: None)
    dest = _fs(dest)
    listing = read_line(rfile)
    try:
        have = _prepare(dest, listing)
    except OSError as exc:
        send_line(wfile, _error_reply(exc))
        raise
    send_line(wfile, {"have": have})
    files = listing["files"]
    manifest = {}
    try:
        reply_fd = wfile.fileno()
    except (AttributeError, OSError, ValueError):
        reply_fd = None
    buf = bytearray(BLOCK)
    writers = _Writers(WRITERS, IN_FLIGHT, reply_fd)
    try:
        while True:
            index, size = HEADER.unpack(_read_exact(rfile, HEADER.size))
            if index < 0:
                break
            rel, listed_size, mode, mtime = files[index]
            if size != listed_size:
                raise StreamError("%s changed size while it was copied" % rel)
            path = dest if rel == "." else os.path.join(dest, _fs(rel))
            if size <= SMALL_FILE:
                writers.submit(rel, path, _read_file(rfile, size, progress), mode, mtime)
            else:
                manifest[rel] = [size, _receive_file(rfile, path, size, mode, mtime, buf,
                                                     progress, reply_fd)]
        manifest.update(writers.finish())
        for rel, size, _mode, _mtime in files:
            if rel not in manifest:
                if rel not in have:
                    raise StreamError("the sender left out " + rel)
                manifest[rel] = [size, have[rel]]
        for rel, mode, mtime in reversed(listing["dirs"]):  # children first
            path = os.path.join(dest, _fs(rel)) if rel != "." else dest
            os.chmod(path, mode)
            os.utime(path, ns=(mtime, mtime))
    except (OSError, StreamError) as exc:
        writers.stop()
        try:
            send_line(wfile, _error_reply(exc))
        except OSError:
            pass
        raise
    except BaseException:
        writers.stop()
        raise
    send_line(wfile, {"manifest": manifest})
    return manifest


def _read_exact(rfile, n):
    data = rfile.read(n)
    if len(data) != n:
        raise StreamError("the stream ended unexpectedly")
    return data


def main():
    """The site's end: one request line on stdin, then the protocol on stdin/stdout."""
    rfile, wfile = sys.stdin.buffer, sys.stdout.buffer
    grow_pipe(rfile)
    grow_pipe(wfile)
    try:
        request = json.loads(rfile.readline().decode("utf-8"))
        path = request["path"]
        if request["role"] == "receive":
            receive(path, rfile, wfile)
        else:
            send(path, rfile, wfile)
    except (OSError, StreamError) as exc:
        sys.stderr.write("cax stream: %s\n" % exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
