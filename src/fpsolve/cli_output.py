"""Where the ``fpsolve`` commands write, checked before any work and written so no work is lost.

* :func:`check_output_dir` is called by ``demo``, ``bench`` and ``sample`` *before* they sample:
  an ``--out`` that is a file, or a folder that cannot be created or written, is an
  :class:`~fpsolve.errors.InvalidOptionError` naming the path and the fix, not a traceback after
  minutes of sampling.
* :func:`atomic_write` writes through a temporary file in the same folder and renames it into
  place (``os.replace`` is atomic on POSIX and Windows): a reader never sees half a file, and a
  crash while writing leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidOptionError

__all__ = ["check_output_dir", "atomic_write", "write_text_atomic"]


def check_output_dir(path: Path, option: str = "--out") -> Path:
    """Create ``path`` (a folder) if needed and prove it writable by creating a file in it.

    Raises:
        InvalidOptionError: ``path`` is an existing file, or cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidOptionError(
            f"{option}: {path} is a file, but a folder is expected here; give a folder path (it is created)."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fpsolve-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InvalidOptionError(
            f"{option}: the folder {path} is not writable ({reason}); choose a folder you can write to."
        ) from None
    return path


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    The temporary name keeps ``path``'s suffix, so writers that choose a format by suffix
    (matplotlib, PIL) still see it. On an exception the temporary file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)
    return Path(path)
