"""Writing files so that a crash, a kill -9 or a full disk never costs what is already on disk.

Every file ROT5 writes goes through one of two paths:
    atomic_write   a file is replaced only by a complete new version: temp file in the same directory,
                   fsync, os.replace, fsync of the directory (checkpoints, shards, meta.json, predictions, ...);
                   optionally the old version is kept under another name, as atomically (keep_file)
    append_line    an append-only log (metrics.jsonl): an append that fails is undone, so the log never keeps
                   half a line from a failed write (a kill -9 mid-append can still leave one: the log's reader,
                   checkpoint.restart_log, drops it)
A write that fails for lack of space (ENOSPC, a quota, a file-size limit) becomes WriteFailed: one line that
says what could not be written, where, how much space there was and was needed, and what the caller says
about what is intact and how to go on. A killed process leaves its temp files behind: remove_stale_temps
clears them at the next start in that directory.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

# lack of space, as the kernel reports it: a full disk, a disk quota, a file-size limit (ulimit -f)
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class WriteFailed(SystemExit):
    """A write that failed for lack of space, as one line for the user: a SystemExit, so no traceback."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", needed: int | None = None, then: str = "",
                 keep_previous: str | None = None) -> Iterator[IO]:
    """Write path through a temp file in the same directory (os.replace is atomic only within one file system):
    the body writes to the yielded file; its bytes are fsynced before the rename makes them visible, and the
    directory after it, so that a power cut cannot undo the rename. A crash or an error at any point leaves
    the old file (or none) and no temp file. needed: the bytes the file will take, if known, for the message.
    keep_previous: a path in the same directory that receives the old file (if any) just before the new one
    replaces it, atomically too (keep_file): at every moment both names hold a whole file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any other written file
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and os.path.exists(path):
            keep_file(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (err := space_error(e)) is not None:
            raise write_failed(path, err, needed, written, then) from None
        raise
    fsync_directory(directory)


def keep_file(path: str, copy: str) -> None:
    """Make `copy` (same directory) hold what `path` holds, replacing it atomically: a hard link under a temp
    name renamed onto `copy` (no data is copied, and `path` itself is untouched); where the file system has no
    hard links, a copy of the bytes, fsynced, renamed the same way."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(copy)), f".{os.path.basename(copy)}.{os.urandom(4).hex()}.tmp")
    try:
        try:
            os.link(path, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, copy)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def append_line(path: str, line: str, then: str = "") -> None:
    """Append one line (ending in a newline) to a log. If the write fails, the log is cut back to its old end, so
    it never keeps part of the line; lack of space raises WriteFailed."""
    data = memoryview(line.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            while data:  # os.write may write part of the buffer
                data = data[os.write(fd, data):]
        except BaseException as e:
            os.ftruncate(fd, end)  # shrinking a file needs no space
            if (err := space_error(e)) is not None:
                raise write_failed(path, err, len(line.encode("utf-8")), None, then) from None
            raise
    finally:
        os.close(fd)


def check_out_dir(path: str, flag: str = "--out_dir") -> None:
    """An output directory a user named (flag), before any work: a name, not a file, inside a directory this
    process can write (whatever of it does not exist yet is made when writing starts). One line each."""
    if not path.strip():
        raise SystemExit(f"{flag} is empty: name a directory, e.g. {flag}=out/my_run")
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"{flag}={path} is a file, not a directory: pick another {flag}")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"{flag}={path}: {existing} is a file, so no directory can be made under it: pick another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag}={path}: {existing} is not writable by this user (or is on a read-only file system): "
                         f"pick another {flag}")


def remove_stale_temps(directory: str, names: list[str], say=print) -> None:
    """Delete atomic_write's temp files of the given file names in directory: what a killed process left
    (a checkpoint-sized one per kill). Only call it where no other process is writing those files."""
    stale = [p for name in names for p in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp"))]
    freed = 0
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            freed += os.path.getsize(p)
            os.unlink(p)
    if stale:
        say(f"removed {len(stale)} temp file(s) ({human(freed)}) that an interrupted write left in {directory}")


def space_error(e: BaseException | None) -> OSError | None:
    """The lack-of-space OSError behind e, if any: torch.save reports it as a RuntimeError ("unexpected pos")
    whose context is the OSError its file write raised."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_failed(path: str, err: OSError, needed: int | None, written: int | None, then: str) -> WriteFailed:
    """The one-line error for a write of path that failed for lack of space."""
    try:
        free = f"{human(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)} free"
    except OSError:
        free = "free space unknown"
    size = f", {human(needed)} needed" if needed else f", failed after writing {human(written)}" if written else ""
    return WriteFailed(f"could not write {path}: {err.strerror or os.strerror(err.errno)} ({free} on its disk{size})"
                       + (f"; {then}" if then else ""))


def fsync_directory(directory: str) -> None:
    """Make a rename in directory durable (a power cut cannot undo it)."""
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def first_line(e: BaseException) -> str:
    """An exception's message for a one-line error: its first line (its type's name if it has none)."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def human(n: int) -> str:
    """A byte count for a message: 1.2 GB, 340.5 MB, 12.0 kB, 512 B."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
