"""One training run per workdir: `<workdir>/.lock`, held with `flock` for the run's lifetime.

The file names its holder (`{"pid", "host", "started"}`). A second run is
refused at once with a `WorkdirLocked` naming that PID and host. The kernel
drops a `flock` when its process dies, so a lock left by a killed run (kill
-9, a crash, a lost host) is free: the next run takes it over and says whose
it was. Readers (evaluate, generate, export, analysis) never take it. On a file system
without locks (some NFS mounts) the run goes on with a warning, unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from coe_jax.errors import WorkdirLocked

LOCK_FILE = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # e.g. an NFS mount without locking


def _holder(text: str) -> str:
  """'pid N on host H (since T)' from a lock file's text."""
  try:
    info = json.loads(text)
    return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
  except (ValueError, KeyError, TypeError):
    return "an unknown process"


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lock (see the module docstring)."""

  def __init__(self, workdir: str, note=None):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self._note = note or (lambda line: print(line, file=sys.stderr, flush=True))
    self._fd: Optional[int] = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLocked naming the live holder's PID and host."""
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      if not self._flock(fd):
        return
      if _same_file(fd, self.path):  # not unlinked by a holder that just released it
        break
      os.close(fd)
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if previous:
      self._note(
        f"warning: {self.path}: taking over the lock of a run that is gone ({_holder(previous)})"
      )
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd = fd

  def _flock(self, fd: int) -> bool:
    """Locks `fd`: True; False (a warning) on a file system without locks; WorkdirLocked when
    another process holds it."""
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
      os.close(fd)
      raise WorkdirLocked(
        f"--workdir {self.workdir}: another training run holds it ({holder}) ; one run per "
        "workdir: wait for it to end, stop it, or use another --workdir"
      ) from None
    except OSError as error:
      os.close(fd)
      if error.errno not in _NO_LOCKS:
        raise
      self._note(f"warning: {self.path}: {error.strerror}; one run per workdir is not enforced")
      return False

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _same_file(fd: int, path: str) -> bool:
  try:
    a, b = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
