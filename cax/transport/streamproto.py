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
A file is written as ``.NAME.cax-stream`` and renamed into place when complete, so a file
under its final name is always whole: an interrupted copy resumes with only the rest.
Anything in the destination that is not in the listing is removed.
"""

import errno
import json
import os
import select
import shutil
import stat
import struct
import sys
import zlib

BLOCK = 1 << 20
HEADER = struct.Struct("!qq")
TEMP_SUFFIX = ".cax-stream"


class StreamError(Exception):
    """The other end reported an error, or broke the protocol."""

    def __init__(self, message, code=None):
        Exception.__init__(self, message)
        self.errno = code


def _fs(path):
    return path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path


def _rel(root, path):
    rel = os.path.relpath(path, root)
    return "." if rel == b"." else rel.decode("utf-8", "surrogateescape")


def _error_reply(exc):
    if isinstance(exc, OSError):
        where = exc.filename
        if isinstance(where, bytes):
            where = where.decode("utf-8", "backslashreplace")
        text = (exc.strerror or str(exc)) + (": " + str(where) if where is not None else "")
        return {"error": text, "errno": exc.errno}
    return {"error": "%s: %s" % (type(exc).__name__, exc), "errno": None}


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


def adler32_of(path):
    adler = 1
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                return "%08x" % (adler & 0xFFFFFFFF)
            adler = zlib.adler32(view[:n], adler)


# ---------------------------------------------------------------- sender


def list_tree(root):
    """Return the listing of the dataset at ``root`` (a directory tree or one file)."""
    root = _fs(root)
    info = os.stat(root)
    if not stat.S_ISDIR(info.st_mode):
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", root)
        return {"kind": "file", "dirs": [],
                "files": [[".", info.st_size, stat.S_IMODE(info.st_mode), info.st_mtime_ns]]}
    dirs, files = [], []
    for top, subdirs, names in os.walk(root, onerror=_raise):
        subdirs.sort()
        dinfo = os.lstat(top)
        dirs.append([_rel(root, top), stat.S_IMODE(dinfo.st_mode), dinfo.st_mtime_ns])
        for name in sorted(names):
            path = os.path.join(top, name)
            finfo = os.lstat(path)
            if not stat.S_ISREG(finfo.st_mode):
                raise OSError(errno.EINVAL, "symlink or special file in dataset", path)
            files.append([_rel(root, path), finfo.st_size, stat.S_IMODE(finfo.st_mode),
                          finfo.st_mtime_ns])
        for name in subdirs:
            if os.path.islink(os.path.join(top, name)):
                raise OSError(errno.EINVAL, "symlink in dataset", os.path.join(top, name))
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


def _receive_file(rfile, path, size, mode, mtime_ns, buf, progress, reply_fd=None):
    """Write ``size`` bytes from ``rfile`` to ``path`` via a temp name; return the adler32."""
    head, tail = os.path.split(path)
    temp = os.path.join(head, b"." + tail + TEMP_SUFFIX.encode())
    view = memoryview(buf)
    adler, left = 1, size
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        while left:
            n = rfile.readinto(view[:min(left, len(buf))])
            if not n:
                raise StreamError("the stream ended in the middle of a file")
            if _peer_gone(reply_fd):  # aborted: do not write what is still in the pipe
                raise StreamError("the sender went away")
            chunk = view[:n]
            adler = zlib.adler32(chunk, adler)
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
            left -= n
            progress(n)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
    os.rename(temp, path)
    return "%08x" % (adler & 0xFFFFFFFF)


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
    try:
        while True:
            index, size = HEADER.unpack(_read_exact(rfile, HEADER.size))
            if index < 0:
                break
            rel, listed_size, mode, mtime = files[index]
            if size != listed_size:
                raise StreamError("%s changed size while it was copied" % rel)
            path = dest if rel == "." else os.path.join(dest, _fs(rel))
            manifest[rel] = [size, _receive_file(rfile, path, size, mode, mtime, buf, progress,
                                                 reply_fd)]
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
        try:
            send_line(wfile, _error_reply(exc))
        except OSError:
            pass
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
