"""The live run's lock on its directory: an flock, so a dead holder's lock is simply taken over."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from genlab.errors import GenlabError

log = logging.getLogger(__name__)


class RunLocked(GenlabError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory, held by the live run (`flock` on RUN_DIR/.lock).

    The kernel drops an flock when its process dies (kill -9, node lost), so a lock left
    behind is simply taken over; the pid and host written into the file only serve the
    message of a refused second process.
    """

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link: a crafted run's `.lock` may point at a file to overwrite
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            raise GenlabError(f"cannot take the lock {self.path} ({error.strerror}); it must be a plain file "
                              "in the run directory: remove it and run this again.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            try:
                info = json.loads(holder)
                holder = f"pid {info['pid']} on {info['host']} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['since']))}"
            except (ValueError, KeyError, TypeError):
                holder = "another process"
            raise RunLocked(f"{self.path.parent} is in use by {holder}; wait for it to end (or stop it), "
                            "or train into another directory.") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            log.info("took over the lock of %s (that process is gone)", self.path.parent)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def held_by_a_live_process(path: Path) -> bool:
    """Does a live process (on any host sharing the file system) hold the lock file at `path`?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
