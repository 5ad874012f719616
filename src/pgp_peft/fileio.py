"""Atomic file and folder writes: readers (a resumed run, a dashboard, the Hub upload) never see half a file.

Temporary files and folders from `tempfile` are private (0600 / 0700); everything put in place here
gets the permissions a plain `open()` / `mkdir()` would have given under the current umask, so saved
adapters and checkpoints stay readable by the group as usual.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_permissions(path: Path, *, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


# Every temporary name of an atomic write starts with this, so what a kill leaves behind can be found (and
# removed) without touching anything else of the user's.
STAGING_PREFIX = ".pgp-staging."


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `path`, then `os.replace` it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        _default_permissions(Path(tmp), directory=False)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (flushed and fsynced before the rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write)


def staging_dir(target: str | os.PathLike) -> Path:
    """A fresh hidden folder beside `target`, to fill and then move into place with `os.replace`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}.", dir=target.parent))
    _default_permissions(staging, directory=True)
    return staging


def publish_files(staging: Path, target: Path, last: str | None = None) -> None:
    """Move every file of `staging` into folder `target` one by one (`last` moved last), then fix modes."""
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(staging), key=lambda name: (name == last, name)):
        _default_permissions(staging / name, directory=(staging / name).is_dir())
        os.replace(staging / name, target / name)


def replace_dir(staging: Path, target: Path) -> None:
    """Swap folder `target` for `staging` by renames, so a complete `target` exists at every moment
    but the instant between the two renames (the old one then waits under `.pgp-staging.<name>.old`)."""
    retired = target.with_name(f"{STAGING_PREFIX}{target.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
