"""One writer per activation store: `StoreLock` holds ``out_dir/.lock`` while `cache_activations` writes there.

The lock is an exclusive ``flock`` on ``.lock`` (the kernel drops it when its process dies, even by SIGKILL, so the
lock of a dead process is taken over by the next writer with nothing to clean), and the file names its holder
(``{"pid": ..., "host": ...}``) for the message a second writer gets. Where the filesystem has no ``flock`` the file
alone is the lock: held while it names a running process (of this host, or any process of another host), taken over
when its pid runs no process of this host (two writers starting in the same instant can both win there).

Under torchrun, rank 0 holds the lock for the whole job (`unilens.scale.writer`): the other ranks write only the
shard files rank 0's plan gives them, after rank 0 has taken the lock, and rank 0 releases it after the last barrier.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from .store_format import LOCK, CacheError, CacheLockedError

try:
    import fcntl
except ImportError:  # not POSIX: the file alone is the lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["StoreLock"]

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one that is not ours to signal still runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> dict[str, Any]:
    """What the lock file open as ``fd`` says of its holder (``{}`` when it is empty or unreadable)."""
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class StoreLock:
    """``out_dir/.lock`` held by this process while it writes the store (see the module doc).

    ``StoreLock(out_dir)`` creates ``out_dir`` (and its missing parents) if needed and takes the lock, or raises
    `CacheLockedError` at once naming the holder: ``another process (pid N) is writing to DIR; wait for it or
    remove DIR/.lock if no such process runs``. `release` removes the lock file, and the folders it created if they
    are left empty (a run refused before writing anything leaves no trace).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> lock = StoreLock(out)
        >>> try:
        ...     StoreLock(out)
        ... except CacheLockedError as err:
        ...     print("refused:", "is writing to" in str(err))
        refused: True
        >>> lock.release()
        >>> StoreLock(out).release()  # free again
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []  # the folders this lock created, deepest last
        missing = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise CacheError(f"out_dir {self.out_dir} is a file, not a folder: pass a folder.") from None
        except OSError as err:
            raise CacheError(f"cannot create out_dir {self.out_dir} ({err.strerror}): pass a writable folder.") from None
        self.created = [p for p in reversed(missing) if p.is_dir()]
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise

    def _acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(10):  # the file can be removed by the holder's release between our open and our flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise CacheError(f"cannot create {self.path} ({err.strerror}): pass a writable out_dir.") from None
            try:
                if not self._flock(fd):
                    self._exclusive(fd)  # no flock on this filesystem: the file alone is the lock
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # released (and removed) by its holder after we opened it: try the new file
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return
        raise CacheLockedError(f"{self.path} keeps changing: another process is taking and releasing it; wait for it.")

    def _flock(self, fd: int) -> bool:
        """Take the exclusive flock of ``fd``; ``False`` when the filesystem has none; `CacheLockedError` when held."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._locked(_holder(fd)) from None
        except OSError as err:
            if err.errno in _NO_FLOCK:
                return False
            raise
        return True

    def _exclusive(self, fd: int) -> None:
        """Without flock: the lock is ours when the file names no live holder (a dead pid of this host is stale)."""
        holder = _holder(fd)
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and pid != os.getpid() and (host != socket.gethostname() or _alive(pid)):
            raise self._locked(holder)

    def _locked(self, holder: dict[str, Any]) -> CacheLockedError:
        pid, host = holder.get("pid", "unknown"), holder.get("host")
        where = f" on host {host}" if host and host != socket.gethostname() else ""
        if pid == os.getpid() and not where:
            return CacheLockedError(
                f"another cache_activations call in this process (pid {pid}) is writing to {self.out_dir}; wait "
                "for it to finish, or pass another out_dir."
            )
        return CacheLockedError(
            f"another process (pid {pid}{where}) is writing to {self.out_dir}; wait for it or remove {self.path} "
            "if no such process runs."
        )

    def release(self) -> None:
        """Remove the lock file and let go of it (then the folders it created, if empty). Idempotent."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while still held: a writer that opened it retries
        finally:
            os.close(self.fd)
            self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self.created):  # deepest first; a folder with files in it stays
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
