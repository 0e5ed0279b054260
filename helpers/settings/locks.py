"""Folder locks between processes: one writer at a time for a store, a training run, a sweep's SAEs.

`FolderLock(folder, what)` guards `folder` through a lock file beside it, ``.<folder name>.lock`` in
its parent (beside, not inside, so that the folder itself may be moved aside or replaced while locked).
It is an OS advisory lock (`fcntl.flock`): the kernel releases it when its process ends, however it
ends, so a crashed holder never blocks anyone. The file also holds the holder's pid, host and start
time, which every refusal names.

Some mounts (network and FUSE file systems, Google Drive's among them on some systems) refuse
`flock`. There the lock falls back to a marker file, ``.<folder name>.pidlock``, created exclusively
and holding the same pid, host and time, and deleted on release. A crashed process cannot delete it:
a marker left by a process of this host that is no longer running is taken over with a warning; one
left by another machine cannot be checked from here, and the refusal says to delete the marker once
that machine has stopped.

`flock` coordinates the processes of one machine. Two machines writing one folder of a synced drive
are not coordinated by it (each sees only its own locks): run one writer at a time across machines.

Locks are between processes: a process that holds a lock may take it again (it is counted, and
released by the last `release`), so nested steps (a sweep, then its training run) do not block
themselves.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: marker files only
    fcntl = None

# errno values meaning "this file system does not do flock" (not "someone holds it")
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL,
                getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_held: dict[str, list] = {}  # lock path -> [count, open file or None (marker)], in this process
_guard = threading.Lock()


class LockBusy(RuntimeError):
    """Another process holds the folder's lock."""


def lock_path(folder) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def marker_path(folder) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.pidlock"


def default_wait() -> float:
    """How long the workbook's steps wait for a busy lock: $SAE_LOCK_WAIT seconds (default: as long as
    it takes, printing who holds it once)."""
    return float(os.environ.get("SAE_LOCK_WAIT") or "inf")


def _me(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_holder(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return {"raw": text[:200]}


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    if "raw" in holder:
        return f"an unknown holder ({holder['raw']!r})"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
            + (f" ({holder['what']})" if holder.get("what") else ""))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on `folder` (see the module docstring). `what` says what the holder does (it
    appears in the message another process gets). `wait`: seconds to wait for a busy lock (0: refuse
    at once with LockBusy; None: `default_wait()`); while waiting, who holds it is printed once."""

    def __init__(self, folder, what: str = "", wait: float | None = 0.0, poll: float = 0.5):
        self.folder = Path(folder).absolute()
        self.what = what or f"writing {self.folder}"
        self.wait = default_wait() if wait is None else float(wait)
        self.poll = poll
        self.path = lock_path(self.folder)
        self.key = None  # the lock path held (the flock file or the marker), once acquired

    # ---- taking it ---------------------------------------------------------------------------
    def _try_flock(self):
        """True: acquired; False: busy; None: the file system does not do flock."""
        if fcntl is None:
            return None
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in _UNSUPPORTED:
                return None
            raise
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_me(self.what)))
        f.flush()
        _held[str(self.path)] = [1, f]
        self.key = str(self.path)
        return True

    def _try_marker(self) -> bool:
        path = marker_path(self.folder)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if (holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                    and holder["pid"] != os.getpid() and not _alive(holder["pid"])):
                warnings.warn(f"taking over the lock {path} left by {describe(holder)}, which is no longer "
                              "running", stacklevel=4)
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                return self._try_marker()
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_me(self.what)))
            f.flush()
            os.fsync(f.fileno())
        _held[str(path)] = [1, None]
        self.key = str(path)
        return True

    def _busy_message(self) -> str:
        marker = marker_path(self.folder)
        if marker.exists():
            return (f"{self.folder} is locked by {describe(_read_holder(marker))} (lock file {marker}, a marker: "
                    "this file system does not do OS locks). If that process is not running any more (a "
                    f"machine that disconnected), delete {marker} and run again")
        return (f"{self.folder} is locked by {describe(_read_holder(self.path))} (lock file {self.path}); "
                "wait for it to finish, or stop that process (its lock goes with it)")

    def _try(self) -> bool:
        with _guard:
            for key in (str(self.path), str(marker_path(self.folder))):
                if key in _held:  # this process holds it already
                    _held[key][0] += 1
                    self.key = key
                    return True
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            got = self._try_flock()
            if got is None:
                got = self._try_marker()
            return got

    def acquire(self) -> "FolderLock":
        deadline = time.monotonic() + self.wait
        told = False
        while not self._try():
            message = self._busy_message()
            if time.monotonic() >= deadline:
                raise LockBusy(message)
            if not told:
                print(f"waiting: {message}", flush=True)
                told = True
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))
        if told:
            print(f"{self.folder}: lock acquired, continuing", flush=True)
        return self

    def release(self) -> None:
        if self.key is None:
            return
        with _guard:
            entry = _held.get(self.key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del _held[self.key]
                    f = entry[1]
                    if f is None:
                        try:
                            Path(self.key).unlink()
                        except FileNotFoundError:
                            pass
                    else:
                        f.seek(0)
                        f.truncate()
                        f.close()  # closing releases the flock
            self.key = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def tmp_name(path) -> Path:
    """A temporary name beside `path` unique to this process and call (``<name>.<pid>-<random>.tmp``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(3).hex()}.tmp")
