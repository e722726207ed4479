"""Writing outputs so that nothing is lost: atomic files and folders, and no silent overwrites.

Every output (models, sidecars, reports, indexes, caches) is written to a temporary sibling path and
renamed into place, so a crash never leaves a half-written file or folder that a later run mistakes
for complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retromae_st.errors import UserInputError

LOCK_FILE = ".retromae-st.lock"


def current_umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes a file the user writes gets.

    ``mkdtemp``/``mkstemp`` and safetensors create 0700/0600 entries whatever the umask, so a model or a
    report would be unreadable to the group and others even under umask 022. Applied before the rename.
    """
    path = Path(path)
    umask = current_umask()
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        if stat.S_ISDIR(info.st_mode):
            os.chmod(entry, dir_mode)
        else:
            # Keep execute bits a writer set on purpose (none of ours do), as umask would.
            os.chmod(entry, file_mode | (info.st_mode & 0o111 & ~umask))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def temp_prefix(path: Path) -> str:
    # The owner's pid is in the name, so a later run can tell a dead writer's leftovers from a live one's.
    return f".{path.name}.tmp-{os.getpid()}-"


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by a writer that was killed (its pid is not alive).

    Only names this module makes are touched (``.NAME.tmp-PID-*``, and ``.NAME.old-PID`` once ``path``
    exists again); a temporary of a live process, or one without a pid in its name, is left alone.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)(-.*)?$")
    removed = []
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not path.exists():
            continue  # killed between the two renames: the previous version is the only complete one
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                sibling.unlink()
        removed.append(sibling)
    return removed


def _refuse_non_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserInputError(
            f"{path} exists and is not a folder: choose another output folder (or remove that file)."
        )


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``folder`` for the block: one run writes into it at a time.

    The lock is ``fcntl.flock`` on ``folder/.retromae-st.lock``; the kernel drops it when the process
    ends, even on SIGKILL, so a crashed run never leaves a stale lock. The file holds the owner's pid,
    which a refused second run names. A folder this call created and that is still empty at the end (the
    run failed before writing anything) is removed again.

    Raises:
        UserInputError: another process holds the lock, or ``folder`` is a file.
    """
    folder = Path(folder)
    _refuse_non_folder(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    while True:
        handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserInputError(
                f"{folder} is in use by another retromae-st run (pid {owner}): wait for it to finish, "
                "or choose another output folder."
            ) from None
        # The file may have been removed by its previous holder between our open and our lock: then this
        # lock guards nothing, and the file at the path is the one to lock.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield folder
    finally:
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                lock_path.unlink()
                folder.rmdir()
        handle.close()  # closing the file releases the lock


def ensure_can_write(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an existing output unless the user asked for it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserInputError(f"{path} already exists: choose another output path or pass --overwrite.")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    ensure_can_write(path, overwrite)
    _refuse_non_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        make_readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        # Move the old output aside first so that at every instant one complete version exists.
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    _refuse_non_folder(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
