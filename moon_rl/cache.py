"""Where moon-rl keeps generated artefacts (builtin models, synthetic catalogues), and atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """`$MOON_RL_CACHE`, else `$XDG_CACHE_HOME/moon-rl`, else `~/.cache/moon-rl`."""
    if env := os.environ.get("MOON_RL_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moon-rl"


@contextlib.contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock on building the cache entry `final` (a hidden `.<name>.lock` file beside it).

    A second process that wants the same entry waits for the first and then finds it built, instead of building it
    again beside it (two test workers on two cores each spent the builtin model's 27 s building it). Callers check
    for the entry again inside the lock. Advisory (`fcntl.flock`); where fcntl is missing this is a no-op, and
    `atomic_dir(replace=False)` still keeps concurrent builds correct.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `final` (replacing it), on error removed.

    A crash at any moment leaves either the old `final` or the new one, never a half-written folder. With
    `replace=False` (deterministic cache builds) a `final` that appeared meanwhile is kept and this copy discarded:
    two processes building the same cache entry race harmlessly, and the one already reading it is never pulled out
    from under it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes the folder private (0700); the result is an ordinary output folder, so honour the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if final.exists() and replace:
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing (`"wb"`, or `"w"` for UTF-8 text); on success it is flushed,
    synced and renamed to `path`, on error removed: readers never see a partial file, even when it was streamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and `os.replace`, so readers never see a partial file."""
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))
