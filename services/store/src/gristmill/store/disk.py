"""The store's volume: private modes, disk-full errors and a space reserve.

Every file and directory the store creates is private to the server's user
(0600/0700). An ``OSError`` from the volume becomes a domain error naming the
operation: ENOSPC and EDQUOT are RESOURCE_EXHAUSTED with reason ``DISK_FULL``,
EBUSY (a database locked by another process) UNAVAILABLE, anything else
INTERNAL with reason ``STORAGE_ERROR``.

:class:`DiskReserve` keeps a few MiB allocated in a file of its own. When the
catalog cannot write because the volume is full, the reserve is released so
that metadata-only work (deduplicated uploads, deletes) still goes through;
garbage collection puts it back once there is room.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from gristmill.client.errors import GristmillError, Internal, ResourceExhausted, Unavailable
from gristmill.client.private import DIR_MODE, FILE_MODE, private_dir

__all__ = [
    "DIR_MODE",
    "DISK_FULL",
    "FILE_MODE",
    "DiskReserve",
    "disk_full",
    "is_disk_full",
    "private_dir",
    "storage_error",
]

log = logging.getLogger("gristmill.store")

DISK_FULL = "DISK_FULL"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(error: BaseException) -> bool:
    """Whether an error says the volume (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in _FULL_ERRNOS


def disk_full(what: str, directory: Path | str) -> ResourceExhausted:
    """The error for a write refused because the store's volume is full."""
    return ResourceExhausted(
        f"disk full: {what}; free space on the store's volume ({directory}) or run "
        "`gristmill store gc` to remove unreferenced blobs", reason=DISK_FULL)


def storage_error(operation: str, error: OSError, directory: Path | str) -> GristmillError:
    """A domain error for an ``OSError`` raised while the store ``operation`` ran."""
    if is_disk_full(error):
        return disk_full(f"cannot {operation}", directory)
    if error.errno == errno.EBUSY:  # a database another process holds locked
        return Unavailable(f"the store cannot {operation} now: {error.strerror or error}; "
                           "another process (`gristmill store gc`?) holds it, retry in a "
                           "moment", reason="STORAGE_BUSY")
    name = errno.errorcode.get(error.errno or 0, "")
    why = f"{error.strerror or error}" + (f" ({name})" if name else "")
    return Internal(f"the store cannot {operation}: {why}; check the store's volume "
                    f"({directory}) and the data directory's owner and permissions",
                    reason="STORAGE_ERROR")


class DiskReserve:
    """A file holding ``size`` bytes of the volume for metadata writes on a full disk."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def ensure(self) -> bool:
        """Allocate the reserve if it is missing and the volume has room; True if it exists."""
        if self.size <= 0:
            return False
        try:
            if self.path.stat().st_size >= self.size:
                return True
        except FileNotFoundError:
            pass
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 2 * self.size:
                return False  # too close to full: keep the room for data
            tmp = self.path.with_name(self.path.name + ".new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    block = b"\0" * (1 << 20)
                    for pos in range(0, self.size, len(block)):
                        os.pwrite(fd, block[:self.size - pos], pos)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            self.path.with_name(self.path.name + ".new").unlink(missing_ok=True)
            log.warning("cannot allocate the disk reserve %s: %s", self.path, e)
            return False
        return True

    def release(self) -> bool:
        """Free the reserve; True if there was one to free."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.warning("disk full: released the %d-byte reserve %s so that metadata writes go on; "
                    "free space or run `gristmill store gc`", self.size, self.path)
        return True
