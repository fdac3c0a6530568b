"""Failed writes told apart from bugs: out of space, read-only, permission denied.

`problem(error)` finds, anywhere in an exception's chain, an `OSError` whose
errno says the disk is full (ENOSPC, EDQUOT, EFBIG), read-only (EROFS) or
forbidden (EACCES, EPERM), or the same failure reported as text by
TensorStore (Orbax's writer: `... Failed writing: "PATH" ... [os_error_code='28']`),
and returns the path and what went wrong. `storage_error` turns it into the
one-line `StorageError` the command lines print.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Iterator, Optional

from coe_jax.errors import StorageError

SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
SPACE[errno.EFBIG] = "file too large (file size limit reached)"
SHORT_WRITE = "write cut short (no space left on device, or a file size limit)"
DENIED = {
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
}
REASONS = {**SPACE, **DENIED}
_TEXT_CODE = re.compile(r"os_error_code='?(\d+)")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_TEXT_PATH = re.compile(r'(?:Failed writing|Error writing[^"]*local file|file): "([^"]+)"')


def chain(error: BaseException) -> Iterator[BaseException]:
  """`error`, then its cause or context, and so on."""
  seen: set[int] = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def problem(error: BaseException) -> Optional[tuple[str, str]]:
  """(path or '', reason) of a full/read-only/forbidden-disk failure in `error`'s chain, or None."""
  for e in chain(error):
    if isinstance(e, StorageError):
      return e.path, str(e)
    if isinstance(e, OSError) and e.errno in REASONS:
      return str(e.filename or ""), REASONS[e.errno]
    if isinstance(e, OSError) and e.errno is None and _SHORT_WRITE.search(str(e)):
      return "", SHORT_WRITE  # numpy's short write
    code = _TEXT_CODE.search(str(e))
    if code and int(code.group(1)) in REASONS:
      path = _TEXT_PATH.search(str(e))
      return (path.group(1) if path else ""), REASONS[int(code.group(1))]
  return None


def human_bytes(n: float) -> str:
  """'552.6 KB' and the like (powers of 1024)."""
  for unit in ("bytes", "KB", "MB", "GB", "TB"):
    if abs(n) < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TB"


def free_bytes(path: str) -> Optional[int]:
  """Free bytes on the file system holding `path` (or its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def storage_error(
  error: BaseException, what: str, fallback_path: str, needed: Optional[int] = None, kept: str = ""
) -> Optional[StorageError]:
  """A one-line StorageError for `error` when it is a storage failure, else None.

  `what` says what was being written (e.g. 'checkpoint step 10'), `needed` its
  size when known, `kept` what is intact (e.g. 'the last complete checkpoint
  (step 5) is intact').
  """
  found = problem(error)
  if found is None:
    return None
  path, reason = found
  if isinstance(error, StorageError):
    return error
  path = fallback_path if not path or ".orbax-checkpoint-tmp" in path else path
  size = ""
  out_of_space = reason in SPACE.values() or reason == SHORT_WRITE
  if needed is not None and out_of_space:
    free = free_bytes(path)
    size = f" (needs about {human_bytes(needed)}" + (
      f", {human_bytes(free)} free)" if free is not None else ")"
    )
  remedy = (
    "free some space or use another --workdir"
    if out_of_space
    else "make it writable or use another --workdir"
  )
  parts = [f"{path}: {reason} writing {what}{size}", kept, remedy]
  return StorageError(" ; ".join(p for p in parts if p), path, says_what_is_kept=bool(kept))


def remove_quietly(path: str) -> None:
  """Removes a file or directory tree, ignoring a path that is gone or cannot be removed."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    try:
      os.remove(path)
    except OSError:
      pass


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: a reader (or a resumed run)
  sees the old file or the new one, never half of it; a failed write leaves no temporary file."""
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    remove_quietly(tmp)
    raise
