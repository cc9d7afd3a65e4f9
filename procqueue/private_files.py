"""Files that only their owner can have written: the status file and its directory.

The status file tells a liveness probe whether to restart the processor, and a processor
run as root writes it. Both trust it only in a directory that is provably the owner's:
a real directory (not a symbolic link another user planted), owned by that user (or
root), that no one else can write to. The writer creates it with mode 0700, holds it open
once checked (so a path swapped afterwards changes nothing), and creates its temporary
files exclusively, never through a link; the reader opens the file without following a
link and checks who owns it.

Standard library only: `procqueue-health` imports this and must start fast.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

# A status document is a few kilobytes; a reader stops well before memory matters.
MAX_READ_BYTES = 16 * 2**20


class UnsafePathError(Exception):
    """A path another user could control; the message says which and why, in one line.
    `wrong_owner`: it belongs to another user (perhaps the one the processor runs as)."""

    def __init__(self, message: str, *, wrong_owner: bool = False) -> None:
        super().__init__(message)
        self.wrong_owner = wrong_owner


# What the writer says to do about a directory it refuses; the reader only distrusts.
WRITER_REMEDY = "; remove it or choose another path"


def check_directory(path: Path, info: os.stat_result, owner: int, remedy: str = "") -> None:
    """UnsafePathError unless `info` (the directory's lstat or fstat) shows a real
    directory owned by `owner` or root and writable by no one else."""
    if stat.S_ISLNK(info.st_mode):
        raise _link_error(path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if info.st_uid not in (owner, 0):
        raise UnsafePathError(f"directory {path} belongs to uid {info.st_uid}, not to uid {owner}"
                              f"{_who(owner)}: that user could rewrite what is in it{remedy}", wrong_owner=True)
    writers = _other_writers(info.st_mode)
    if writers:
        raise UnsafePathError(f"directory {path} can be written by {writers} (mode {stat.S_IMODE(info.st_mode):04o}): "
                              f"anyone there could replace what is in it{remedy and '; chmod go-w it or choose another path'}")


def _link_error(path: Path) -> UnsafePathError:
    try:
        target = f" (to {os.readlink(path)!r})"
    except OSError:
        target = ""
    return UnsafePathError(f"directory {path} is a symbolic link{target}, which another user may have planted; "
                           "give the real directory")


def open_private_directory(path: Path) -> int:
    """Create `path` (mode 0700) if it is missing, check it, and return a descriptor of it
    opened without following a link: writes made relative to it land in the directory
    that was checked, whatever happens to the path afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    checked = os.lstat(path)
    check_directory(path, checked, os.geteuid(), WRITER_REMEDY)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise UnsafePathError(f"directory {path} was replaced while it was being checked")
    return fd


def write_file(dir_fd: int, name: str, data: bytes, temporary: str) -> None:
    """Replace `name` in the directory whole: write `temporary` (created exclusively, never
    through a link), then rename it over `name`, so a reader sees the old file or the new."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o644, dir_fd=dir_fd)
    except FileExistsError:  # left by a write that failed midway, or a dead process of the same pid
        os.unlink(temporary, dir_fd=dir_fd)
        fd = os.open(temporary, flags, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def read_owned_file(path: Path, owner: int) -> bytes:
    """The file's bytes, or UnsafePathError unless it is a regular file owned by `owner`,
    writable by no one else, in a directory that passes check_directory. OSError (missing,
    unreadable) passes through."""
    path = Path(path)
    try:  # opened first, then judged by what was opened: nothing can be swapped in between
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # a link gives ELOOP, or ENOTDIR with O_DIRECTORY (Linux)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path.parent):
            raise _link_error(path.parent) from None
        raise
    try:
        check_directory(path.parent, os.fstat(dir_fd), owner)
        try:  # O_NONBLOCK: a FIFO planted in its place must not hang the probe
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if os.path.islink(path):
                raise UnsafePathError(f"{path} is a symbolic link; a status file is never one") from None
            raise exc from None
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{path} is not a regular file")
        if info.st_uid != owner:
            raise UnsafePathError(f"{path} belongs to uid {info.st_uid}, not to uid {owner}{_who(owner)}, "
                                  "the user it is expected from", wrong_owner=True)
        writers = _other_writers(info.st_mode)
        if writers:
            raise UnsafePathError(f"{path} can be written by {writers} (mode {stat.S_IMODE(info.st_mode):04o})")
        chunks, size = [], 0
        while size <= MAX_READ_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def user_id(name_or_uid: str) -> int:
    """The uid of a user given by name or number, or ValueError saying what was expected."""
    text = str(name_or_uid).strip()
    if text.isascii() and text.isdecimal():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"{name_or_uid!r} (expected a user name of this host, or a uid)") from None


def _other_writers(mode: int) -> str:
    return " and ".join(who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit)


def _who(uid: int) -> str:
    return " (this user)" if uid == os.geteuid() else ""
