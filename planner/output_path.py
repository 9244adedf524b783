"""Where a command writes its report: checked before any work starts, never over an input, written whole.

A report path that cannot be written would otherwise fail after the work is done (a benchmark grid's results
lost), and a path that names the command's own input would replace the user's config with the report. The
check runs as soon as the flags are parsed; the write goes to a temporary file beside the target and is
renamed over it only when complete, so a full disk leaves the old file as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

FLAG = "--output"


def check_output_path(path: Optional[Path], inputs: Iterable[tuple[str, Path]] = (), flag: str = FLAG) -> None:
    """ValueError naming `flag` when `path` cannot take a report: empty, a folder, not a regular file, in a
    folder that does not exist or cannot be written, or the same file as one of `inputs` ((flag, path))."""
    if path is None:
        return
    shown = repr(str(path))[:200]
    if not str(path).strip() or str(path) in (".", ".."):
        raise ValueError(f"argument {flag}: give a file name, got {shown}")
    if path.exists():
        if path.is_dir():
            raise ValueError(f"argument {flag}: {shown} is a folder; give a file path inside it")
        if not path.is_file():
            raise ValueError(f"argument {flag}: {shown} is not a regular file (a device or a pipe); give a file path")
        for input_flag, input_path in inputs:
            if input_path is not None and Path(input_path).exists() and os.path.samefile(path, input_path):
                raise ValueError(f"argument {flag}: {shown} is the file {input_flag} reads; the report would "
                                 f"replace it, so write it elsewhere")
        if not os.access(path, os.W_OK):
            raise ValueError(f"argument {flag}: {shown} is not writable")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"argument {flag}: the folder {repr(str(folder))[:200]} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"argument {flag}: the folder {repr(str(folder))[:200]} is not writable")


def write_output(data: bytes, path: Path) -> None:
    """Write `data` to `path` whole or not at all (OSError, the old file untouched)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask
