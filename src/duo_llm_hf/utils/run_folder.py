"""One writer per run folder, and no writes through links inside it.

**The lock.** Every command that writes a run folder (train, train-router, finetune, oracle, study, ablation)
holds `run_lock` on it for the life of the run: an exclusive ``fcntl.flock`` on ``<folder>/.duo-llm.lock``, which
holds the holder's PID for the error message. A second writer is refused at once with a `RunFolderBusy` naming
that PID. The kernel drops a flock when its process dies (kill -9 included), so a lock file left by a killed
run is simply taken over; no PID is ever probed. In a launch of several processes only the main one (rank 0)
takes it. The lock is re-entrant within a process, so a study or an ablation, which holds its folder, can run
stages that take the lock of the same folder again. Released, the lock file is removed (while still locked, and
a taker checks that the file it locked is still the one at the path, so two runs never hold two files), and a
folder the lock created that is still empty goes with it.

**Links.** The project never makes a symbolic link inside a run folder, so a link found there was put there by
someone else, and a save, a clean-up or a pruning through it would write or delete outside the run.
`refuse_links` refuses them. Two links are the user's to make: the run folder itself, and its ``checkpoints/``
folder (to keep checkpoints on another disk); what lies inside a linked ``checkpoints/`` is checked like the rest.
Only POSIX systems have ``fcntl``; elsewhere the lock is not taken (and a warning says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError
from .processes import is_main_process

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".duo-llm.lock"
# Links a user may make inside a run folder: its checkpoints folder (to keep checkpoints on another disk).
ALLOWED_LINKS = ("checkpoints",)

# Locks this process holds: real path of the folder -> [file descriptor, depth]; guarded for threads.
_held: dict[str, list[int]] = {}
_guard = threading.Lock()


class RunFolderBusy(UsageError):
    """Another process holds the run folder's lock."""


class ForeignLink(UsageError):
    """A symbolic link inside a run folder that the project did not make."""


@contextmanager
def run_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold the exclusive lock of run folder ``folder`` (created if missing) for the block; yield the folder.

    Refuses (`RunFolderBusy`, naming the holder's PID) when another process holds it, and refuses a folder
    holding a link the project did not make (`refuse_links`). Only the main process of a launch locks.
    """
    folder = Path(folder)
    if not is_main_process() or fcntl is None:
        if fcntl is None:
            logger.warning("%s: no fcntl on this system; the run folder is not locked against a second writer.", folder)
        yield folder
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"output folder {str(folder)!r} is not a folder (a file is in its way).") from None
    except OSError as err:  # no permission, a read-only file system
        raise UsageError(f"output folder {str(folder)!r} cannot be created ({err.strerror}).") from None
    key = os.path.realpath(folder)
    with _guard:
        held = _held.get(key)
        if held is None:
            _held[key] = held = [_acquire(folder, what), 0]
        held[1] += 1
    try:
        refuse_links(folder)
        yield folder
    finally:
        with _guard:
            held[1] -= 1
            if held[1] == 0:
                del _held[key]
                _release(folder, held[0], created)


def _acquire(folder: Path, what: str) -> int:
    """Lock ``folder/LOCK_FILE`` (taking over one left by a dead process); return its descriptor."""
    path = folder / LOCK_FILE
    if path.is_symlink():
        raise ForeignLink(f"{path} is a symbolic link; the run's lock file is never one. Remove it.")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:  # no permission, a read-only file system
            raise UsageError(f"output folder {str(folder)!r} cannot be written ({err.strerror}).") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"{folder} is in use by another {what} (PID {holder} holds {path}); wait for it to end, or choose "
                "another output folder."
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # its holder removed it between our open and our lock
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its releasing holder had already removed: lock the current one
    stale = os.read(fd, 64).decode(errors="replace").strip()
    if stale:
        logger.info("%s: taking over the lock left by PID %s, which no longer holds it.", folder, stale)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(folder: Path, fd: int, created: bool) -> None:
    """Remove the lock file while still holding it, then unlock; remove ``folder`` if the lock made it and it is
    empty (a run refused before it wrote anything leaves no folder behind)."""
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)  # closing the last descriptor drops the flock
    if created:
        with contextlib.suppress(OSError):  # not empty: the run wrote something
            folder.rmdir()


def held_locks() -> list[str]:
    """The run folders this process holds locked (real paths)."""
    with _guard:
        return sorted(_held)


def refuse_links(folder: str | os.PathLike) -> None:
    """Raise `ForeignLink` for the first symbolic link inside ``folder`` other than an allowed ``checkpoints``
    link (`ALLOWED_LINKS`); the folder itself may be one. Nothing is followed except an allowed link, whose
    content is checked too."""
    folder = Path(folder)
    todo = [folder]
    while todo:
        current = todo.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                if entry.name in ALLOWED_LINKS and path.is_dir():
                    todo.append(path)
                    continue
                raise ForeignLink(
                    f"{path} is a symbolic link inside the run folder {folder}; a save or clean-up there would "
                    f"write outside the run. Remove it (only the run folder itself and its "
                    f"{'/, '.join(ALLOWED_LINKS)}/ folder may be links)."
                )
            if entry.is_dir(follow_symlinks=False):
                todo.append(path)


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file or folder tree without following any link: a link is removed itself, never its target."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)  # rmtree never follows links inside the tree (it unlinks them)
