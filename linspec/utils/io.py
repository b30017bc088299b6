"""Atomic writes: every file or directory linspec produces appears complete or not at all.

Each write goes to a temporary sibling named after the target and the writing process
(``.NAME.HOST-PID.RANDOM.partial``), which is renamed into place when complete. A process killed mid-write
(SIGKILL, power loss) leaves only such a sibling; the next write to the same target removes siblings whose
process is gone. A directory is written under an exclusive lock (``.NAME.lock``, removed afterwards), so two
processes writing the same output never both "succeed": the second is refused at once.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from linspec.errors import LinspecError

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"
_OWNER = re.compile(r"\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]+\.(?:partial|old|tmp)$")
# What :func:`check_output_dir` saw of each output it approved, taken by the :func:`atomic_directory` that writes
# it: a command checks its output first, works for minutes, then writes. If another process wrote the output in
# between (two ``convert --force`` runs into one directory), the later writer is refused instead of silently
# replacing a result the other one reported as written.
_SEEN: dict[str, tuple[int, int, int] | None] = {}


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries of ``path`` left by dead processes of this host; return what was removed."""
    path = Path(path)
    removed = []
    pattern = glob.escape(str(path.parent / f".{path.name}.")) + "*"
    for candidate in map(Path, glob.glob(pattern)):
        owner = _OWNER.match(candidate.name[len(path.name) + 1 :])
        if owner is None or owner["host"] != _HOST or _process_alive(int(owner["pid"])):
            continue
        previous = candidate / "previous"
        if candidate.suffix == ".old" and previous.is_dir() and not path.exists():
            os.replace(previous, path)  # killed between moving the old output aside and renaming the new one in
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
        removed.append(candidate)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask (there is no getter: set it and put it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions a rewritten ``path`` keeps, or a new file's under the umask: ``mkstemp`` makes its file 0600,
    and a result the user made should look like any file they make."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def refuse_links(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Refuse a run directory whose own entries ``names`` are symbolic links: linspec writes into them, appends
    to them and (with ``--force``) deletes them, and none of that may reach a file outside the output."""
    folder = Path(folder)
    for name in names:
        if (folder / name).is_symlink():
            raise LinspecError(
                f"{folder / name} is a symbolic link; a run directory's own files must be real files and folders"
            )


def remove_entries(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Delete ``folder/NAME`` for each of ``names`` (files or whole trees), never following a symbolic link: all
    are checked (:func:`refuse_links`) before the first is removed, so a refusal deletes nothing."""
    folder = Path(folder)
    refuse_links(folder, names)
    for name in names:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)  # rmtree removes links inside the tree, never what they point to
        elif target.exists():
            target.unlink()


def _state(path: Path) -> tuple[int, int, int] | None:
    """Identity and last change of ``path`` itself (a link is not followed); None when it does not exist."""
    try:
        stat = path.lstat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns


def check_output_dir(path: str | os.PathLike, force: bool, markers: Sequence[str] = ("config.json",)) -> Path:
    """Refuse to replace an existing output unless ``force``; return the path.

    Even with ``force`` only an empty directory or one holding a marker file (``config.json``: a model
    directory) is replaced, so a mistyped output such as a home directory is never deleted. What the output is
    now is remembered: :func:`atomic_directory` refuses to write it if another process changes it meanwhile.
    """
    path = _check_output(path, force, markers)
    _SEEN[os.path.abspath(path)] = _state(path)
    return path


def _check_output(path: str | os.PathLike, force: bool, markers: Sequence[str]) -> Path:
    path = Path(path)
    if not str(path).strip():
        raise LinspecError("the output path is empty")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise LinspecError(f"{path} exists and is not a directory")
        if not force:
            raise LinspecError(f"{path} already exists; pass --force to overwrite it")
        if any(path.iterdir()) and not any((path / marker).exists() for marker in markers):
            raise LinspecError(
                f"{path} is not empty and holds no {' or '.join(markers)}; refusing to replace it even with --force"
            )
    return path


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a file ``.NAME.lock`` beside it) or raise if another process does."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LinspecError(f"{path} is being written by another process; try again when it has finished") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a lock file its holder has just removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # before unlocking: a waiter that opened this file notices it is gone and retries
        os.close(fd)


RUN_LOCK = ".linspec.lock"
_CLAIMED: dict[str, int] = {}  # run directories this process holds (path -> open, locked file descriptor)


def claim_run_dir(folder: str | os.PathLike) -> None:
    """Hold ``folder`` (a run directory that exists) for the rest of this process, or refuse at once if another
    process holds it: two training runs into one directory would delete and overwrite each other's files.

    The lock is ``flock`` on ``folder/.linspec.lock``, so the system releases it when the holder exits, however it
    exits; the empty file left behind is harmless. Claiming again from the same process is a no-op.
    """
    key = os.path.realpath(folder)
    if key in _CLAIMED:
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return
    lock = Path(folder) / RUN_LOCK
    if lock.is_symlink():
        raise LinspecError(f"{lock} is a symbolic link; a run directory's own files must be real files")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LinspecError(f"{folder} is in use by another linspec run; wait for it to finish") from None
    _CLAIMED[key] = fd


def release_run_dir(folder: str | os.PathLike) -> None:
    """Give up this process's hold on ``folder`` (:func:`claim_run_dir`), e.g. before removing the directory."""
    fd = _CLAIMED.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _open_to_umask(folder: Path) -> None:
    """Give what was written into ``folder`` the umask's permissions where its writer kept it private: the
    safetensors library writes its files 0600 and ``mkdtemp`` makes folders 0700, while a model the user saved
    should be readable like any file they make. ``folder`` itself is one of them (``mkdtemp``'s). Other modes are
    the writer's choice and stay."""
    mask = _umask()
    for entry in (folder, *folder.rglob("*")):
        if entry.is_symlink():
            continue
        mode = entry.stat().st_mode & 0o777
        if entry.is_dir() and mode == 0o700:
            entry.chmod(0o777 & ~mask)
        elif entry.is_file() and mode == 0o600:
            entry.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, force: bool = False, markers: Sequence[str] = ("config.json",)
) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on failure it is removed.

    The old directory (with ``force``, see :func:`check_output_dir`) is moved aside first and deleted only after
    the new one is in place, so an interrupted run never leaves ``path`` half-written. Without ``force`` an
    output that appeared while writing (another process) is left alone and this write fails.
    """
    path = _check_output(path, force, markers)
    seen = _SEEN.pop(os.path.abspath(path), _state(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".partial", dir=path.parent))
        try:
            yield tmp
            _open_to_umask(tmp)
            _check_output(path, force, markers)  # again: it may have appeared (or changed) meanwhile
            if _state(path) != seen:
                raise LinspecError(
                    f"{path} was written by another process while this one worked; not replacing it "
                    "(run again to replace it)"
                )
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
                os.replace(path, old / "previous")
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
