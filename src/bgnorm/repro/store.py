"""The results store of the reproduction suite: one JSON line per finished cell.

A run directory ``DIR`` holds one store file per shard (``results.jsonl`` for an unsharded run,
``results-shard-<i>-of-<n>.jsonl`` for ``--shard i/n``); :func:`read_records` merges every
``results*.jsonl`` in ``DIR``, so shards run by any scheduler (on machines that share ``DIR``, or
copied together afterwards) are reported together.

Guarantees (tested with ``kill -9``):

* A record is appended only once its cell has finished, as one ``write`` of one line on an
  ``O_APPEND`` descriptor followed by ``fsync``, under an exclusive ``flock`` of the store file.
* A torn last line (the process killed inside the write) is ignored by the reader, and the next
  append first terminates it with a newline, so it never corrupts the following record.
* Appends check the cell id under the lock and never write a second record for the same cell;
  the reader also de-duplicates by cell id (first record wins), e.g. across shard files.

* A full disk, an exhausted quota or an unwritable directory raises one
  :class:`DiskFaultError` naming the file and the fix; a partly written line is cut off again
  (the file keeps exactly its finished records).

One cell, one runner: :class:`CellLock` is the claim a runner holds on a cell while it trains
it (a lock file in the cell's folder, created atomically, with a lease that a heartbeat
renews), so that several runners on one directory (a requeued job while the first copy still
runs, the same command started twice) never train the same cell at once.

Cell identity: :func:`cell_id` hashes the canonical JSON of a cell's config, excluding the
``"runtime"`` sub-dict (data paths, loader workers: how a cell is run, not what it computes), so
the same cell run from two machines with different mount points is recognized as the same.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .api import Record

try:  # POSIX advisory locks; without them (Windows) appends are still one write each.
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DISK_ERRNOS",
    "LOCK_NAME",
    "RUNTIME_KEY",
    "config_identity",
    "SCHEMA_VERSION",
    "CellLock",
    "DiskFaultError",
    "RecordedIds",
    "ResultStore",
    "canonical_json",
    "cell_id",
    "describe_holder",
    "disk_fault",
    "finished_at",
    "jsonable",
    "read_records",
    "run_meta",
    "store_path",
    "store_files",
]

SCHEMA_VERSION = 1
#: Config key whose value (a dict) is stored but not part of the cell id.
RUNTIME_KEY = "runtime"
_STORE_RE = re.compile(r"^results(-shard-\d+-of-\d+)?\.jsonl$")
#: The errors of a full disk or an unwritable place: :func:`disk_fault` explains them.
DISK_ERRNOS = frozenset(getattr(errno_mod, name) for name in (
    "ENOSPC", "EDQUOT", "EFBIG", "EACCES", "EPERM", "EROFS") if hasattr(errno_mod, name))
_SPACE_ERRNOS = frozenset(getattr(errno_mod, name) for name in ("ENOSPC", "EDQUOT", "EFBIG")
                          if hasattr(errno_mod, name))


class DiskFaultError(OSError):
    """A file of the run directory could not be written: a full disk or quota, a file-size
    limit, or a directory this user may not write. ``str()`` names the file and the fix; the
    sweep stops (exit status 74) and keeps every finished record.
    """

    def __init__(self, errno: int, message: str, filename: str) -> None:
        super().__init__(errno, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def disk_fault(exc: OSError, path: str | os.PathLike, what: str) -> DiskFaultError:
    """The :class:`DiskFaultError` for ``exc`` (an ``OSError`` with an errno of
    :data:`DISK_ERRNOS`) raised while writing ``what`` at ``path``.

    Example:
        >>> import errno
        >>> print(disk_fault(OSError(errno.ENOSPC, "No space left on device"),
        ...                  "/runs/results.jsonl", "the results store"))
        ... # doctest: +NORMALIZE_WHITESPACE
        cannot write the results store /runs/results.jsonl: No space left on device (ENOSPC);
        free space on that filesystem (or raise the quota), or pass --out on a filesystem with
        room. Every finished cell is kept in the store; run the same command again once fixed
        (unfinished cells resume from their last good checkpoint)
    """
    code = exc.errno or 0
    name = errno_mod.errorcode.get(code, str(code))
    reason = exc.strerror or os.strerror(code)
    if code in _SPACE_ERRNOS:
        fix = ("free space on that filesystem (or raise the quota), or pass --out on a "
               "filesystem with room")
        if code == getattr(errno_mod, "EFBIG", None):
            fix = "raise the file-size limit (ulimit -f) or " + fix
    else:
        fix = ("make that directory writable for this user (e.g. chmod u+w), or pass --out "
               "on a writable filesystem")
    message = (f"cannot write {what} {os.fspath(path)}: {reason} ({name}); {fix}. Every "
               "finished cell is kept in the store; run the same command again once fixed "
               "(unfinished cells resume from their last good checkpoint)")
    return DiskFaultError(code, message, os.fspath(path))


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples turned into lists and non-finite floats into ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys (the form that is hashed into cell ids)."""
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_identity(config: Mapping[str, Any], without: Iterable[str] = ()) -> str:
    """What identifies a cell config: its canonical JSON without ``config["runtime"]`` (what
    :func:`cell_id` hashes), and without the keys ``without`` to identify it up to them (the
    same cell at another training length, or under another G policy).

    Example:
        >>> config_identity({"seed": 0, "steps": 10, "runtime": {"data_root": "/d"}}, ["steps"])
        '{"seed":0}'
    """
    drop = {RUNTIME_KEY, *without}
    return canonical_json({k: v for k, v in config.items() if k not in drop})


def cell_id(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit id of a cell config (``config["runtime"]`` excluded)."""
    return hashlib.sha256(config_identity(config).encode()).hexdigest()[:16]


def store_path(out_dir: str | os.PathLike, shard: tuple[int, int] | None = None) -> Path:
    """The store file of ``shard`` (``(i, n)``, 1-based) in ``out_dir``."""
    out = Path(out_dir)
    if shard is None or shard[1] == 1:
        return out / "results.jsonl"
    i, n = shard
    return out / f"results-shard-{i}-of-{n}.jsonl"


def store_files(out_dir: str | os.PathLike) -> list[Path]:
    """Every store file in ``out_dir``, sorted by name (unsharded first)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_file() and _STORE_RE.match(p.name))


def finished_at() -> str:
    """The time a record is written, as ``meta["finished_at"]`` holds it (local time, ISO)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_meta(**extra: Any) -> dict[str, Any]:
    """Provenance saved with each record: host, versions, time (plus ``extra``)."""
    import platform

    import torch

    meta: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "finished_at": finished_at(),
    }
    try:
        from importlib.metadata import version

        meta["bgnorm"] = version("bgnorm")
    except Exception:  # pragma: no cover - not installed as a distribution
        pass
    commit = _git_commit()
    if commit:
        meta["commit"] = commit
    meta.update(extra)
    return jsonable(meta)


def _git_commit() -> str | None:
    """The checked-out commit of the source tree, read from ``.git`` without running git."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        git = parent / ".git"
        if git.is_dir():
            try:
                head = (git / "HEAD").read_text().strip()
                if head.startswith("ref: "):
                    ref = git / head[5:]
                    if ref.is_file():
                        return ref.read_text().strip()
                    packed = git / "packed-refs"
                    if packed.is_file():
                        for line in packed.read_text().splitlines():
                            if line.endswith(" " + head[5:]):
                                return line.split()[0]
                    return None
                return head
            except OSError:
                return None
    return None


def _record_to_json(record: Record) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "cell_id": record.cell_id,
        "task": record.config.get("task"),
        "status": record.status,
        "config": record.config,
        "result": record.result,
        "seconds": record.seconds,
        "meta": record.meta,
    }


def _record_from_json(obj: Any) -> Record | None:
    if not isinstance(obj, dict):
        return None
    try:
        return Record(
            cell_id=str(obj["cell_id"]),
            config=dict(obj["config"]),
            status=str(obj["status"]),
            result=dict(obj.get("result") or {}),
            seconds=float(obj.get("seconds") or 0.0),
            meta=dict(obj.get("meta") or {}),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _parse_lines(data: bytes) -> tuple[list[Record], int]:
    """Records in ``data`` and the number of unreadable (torn or foreign) lines."""
    records, bad = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = _record_from_json(json.loads(line))
        except ValueError:
            rec = None
        if rec is None:
            bad += 1
        else:
            records.append(rec)
    return records, bad


class ResultStore:
    """One JSONL store file (see the module docstring for the guarantees).

    Example:
        >>> import tempfile
        >>> from bgnorm.repro.api import Record
        >>> store = ResultStore(Path(tempfile.mkdtemp()) / "results.jsonl")
        >>> store.append(Record("abc", {"task": "t"}, "ok", {"acc": 1.0}, 0.1))
        True
        >>> store.append(Record("abc", {"task": "t"}, "ok", {"acc": 1.0}, 0.1))  # duplicate
        False
        >>> [r.cell_id for r in store.records()]
        ['abc']
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        #: Unreadable lines seen by the last read (a torn write leaves one).
        self.bad_lines = 0

    def records(self) -> list[Record]:
        """The records of this file, de-duplicated by cell id (first wins), in file order."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        recs, self.bad_lines = _parse_lines(data)
        return _dedup(recs)

    def finished_ids(self) -> set[str]:
        """Ids of the cells recorded in this file."""
        return {r.cell_id for r in self.records()}

    def append(self, record: Record) -> bool:
        """Durably append ``record``; False (nothing written) if its cell is already recorded."""
        line = (canonical_json(_record_to_json(record)) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise disk_fault(exc, self.path, "the results store") from exc
            raise
        size = None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            existing, _ = _parse_lines(data)
            if any(r.cell_id == record.cell_id for r in existing):
                return False
            if data and not data.endswith(b"\n"):
                line = b"\n" + line  # terminate a torn line left by a killed writer
            written = os.write(fd, line)
            if written != len(line):  # a short write: the disk filled up inside the line
                raise OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC))
            os.fsync(fd)
            return True
        except OSError as exc:
            if size is not None:
                try:  # cut a partly written line off: the file keeps its finished records
                    os.ftruncate(fd, size)
                except OSError:  # pragma: no cover - the reader skips a torn line anyway
                    pass
            if exc.errno in DISK_ERRNOS:
                raise disk_fault(exc, self.path, "the results store") from exc
            raise
        finally:
            os.close(fd)  # also releases the lock


def _dedup(records: Iterable[Record]) -> list[Record]:
    seen: set[str] = set()
    out = []
    for r in records:
        if r.cell_id not in seen:
            seen.add(r.cell_id)
            out.append(r)
    return out


def read_records(out_dir: str | os.PathLike, task: str | None = None) -> list[Record]:
    """All records of every store file in ``out_dir`` (shards merged, de-duplicated by cell id).

    ``task`` keeps only the records of that task.
    """
    recs: list[Record] = []
    for path in store_files(out_dir):
        recs.extend(ResultStore(path).records())
    recs = _dedup(recs)
    if task is not None:
        recs = [r for r in recs if r.config.get("task") == task]
    return recs


class RecordedIds:
    """The ids of the cells recorded in ``out_dir`` (every store file, as :func:`read_records`),
    kept current by :meth:`refresh`, which reads only the bytes appended since its last look.

    A runner checks a cell right after claiming it (another runner may have recorded it just
    before its lock went); with hundreds of cells, reading the whole store for each claim would
    be O(cells x records). Store files only grow by whole-line appends, so each file is read
    from where the last look stopped, up to its last newline (a torn or still-unterminated last
    line is read again next time, once complete). A file that shrank (a failed append cut back),
    was replaced (another inode) or no longer ends a line where the last look stopped is read
    again whole; new shard files are read whole, removed ones forgotten.

    Example:
        >>> import tempfile
        >>> from bgnorm.repro.api import Record
        >>> out = Path(tempfile.mkdtemp())
        >>> ids = RecordedIds(out)
        >>> ids.refresh(); "abc" in ids
        False
        >>> ResultStore(store_path(out)).append(Record("abc", {"task": "t"}, "ok", {}, 0.1))
        True
        >>> ids.refresh(); "abc" in ids, len(ids)
        (True, 1)
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out = Path(out_dir)
        # per store file: ((st_dev, st_ino), bytes consumed, ids in those bytes)
        self._files: dict[Path, tuple[tuple[int, int], int, set[str]]] = {}
        self._ids: set[str] = set()
        #: Bytes read from store files so far (for tests and diagnostics).
        self.bytes_read = 0

    def __contains__(self, cid: object) -> bool:
        return cid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def refresh(self) -> None:
        """Take in what was recorded since the last call."""
        paths = store_files(self.out)
        stale = len(self._files.keys() - set(paths)) > 0
        for gone in self._files.keys() - set(paths):
            del self._files[gone]
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # removed since the listing
                stale |= self._files.pop(path, None) is not None
                continue
            try:
                stale |= self._read_new(path, fd)
            finally:
                os.close(fd)
        if stale:  # a file lost records (or went): the union again
            self._ids = set().union(*(ids for _, _, ids in self._files.values()))

    def _read_new(self, path: Path, fd: int) -> bool:
        """Read ``path``'s new complete lines; True when it was read again from the start."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        old = self._files.get(path)
        restart = old is not None and (
            old[0] != key or st.st_size < old[1]
            or (old[1] > 0 and os.pread(fd, 1, old[1] - 1) != b"\n"))
        key, offset, ids = (key, 0, set()) if old is None or restart else old
        if st.st_size > offset:
            data = os.pread(fd, st.st_size - offset, offset)
            self.bytes_read += len(data)
            end = data.rfind(b"\n") + 1  # complete lines only
            if end:
                recs, _ = _parse_lines(data[:end])
                new = {r.cell_id for r in recs}
                ids |= new
                self._ids |= new
                offset += end
        self._files[path] = (key, offset, ids)
        return restart


# --------------------------------------------------------------------------------------------
# Cell locks: one cell, one runner
# --------------------------------------------------------------------------------------------

#: The lock file in a cell's folder (``DIR/cells/<cell_id>/``).
LOCK_NAME = "lock.json"
_HOST = socket.gethostname()
# Tokens of the locks held by this process: a lock with this host and pid but another token
# was left by an earlier sweep of this same process and is stale.
_LIVE_TOKENS: set[str] = set()
_LIVE_GUARD = threading.Lock()


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rindex(b")") + 2:].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:  # pragma: no cover - e.g. platforms without signals
        return True
    # The pid is taken, but by the same process? (pids are reused)
    now = _process_start(pid)
    return start is None or now is None or now == start


class CellLock:
    """The claim of one runner on one cell: ``lock.json`` in the cell's folder.

    :meth:`acquire` creates the lock atomically (written to a temporary file, then
    ``os.link``-ed into place, which fails if the lock exists, on local and on NFS
    filesystems; ``O_CREAT | O_EXCL`` where links are not supported). It holds the holder's
    host, pid (and the pid's start time, against pid reuse), a random token, the start time
    and the lease's expiry (``time.time()`` seconds). The holder's heartbeat calls
    :meth:`renew` well inside the lease. Another runner takes the lock over when its holder is
    gone: on the same host when the pid no longer runs (``kill -9``, OOM kill); from another
    host when the lease expired (clocks of the hosts must agree to well inside the lease). The
    takeover renames the stale lock aside and checks that it moved the lock it judged, so two
    runners racing for a stale lock cannot both win.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> mine, other = CellLock(folder, 60), CellLock(folder, 60)
        >>> mine.acquire(), other.acquire()
        (True, False)
        >>> other.holder["pid"] == os.getpid() and mine.renew()
        True
        >>> mine.release(); other.acquire()
        True

    Args:
        folder: the cell's folder (created when needed).
        lease_seconds: how long the lock stays valid without a renewal.
    """

    def __init__(self, folder: str | os.PathLike, lease_seconds: float = 120.0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.lease_seconds = float(lease_seconds)
        self.token = uuid.uuid4().hex
        #: The lock of the runner holding the cell, after an :meth:`acquire` that failed.
        self.holder: dict[str, Any] | None = None
        #: The stale lock this runner took over in its last :meth:`acquire`, else None.
        self.took_over: dict[str, Any] | None = None
        self.held = False
        self._started = 0.0

    def _content(self) -> bytes:
        now = time.time()
        return json.dumps({
            "host": _HOST, "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "token": self.token, "started": self._started,
            "expires": now + self.lease_seconds,
            "lease_seconds": self.lease_seconds,
        }).encode()

    def _write_tmp(self) -> Path:
        tmp = self.folder / f".{LOCK_NAME}.{self.token}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(self._content())
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _create(self) -> bool:
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            # FileNotFoundError: the folder went (the cell was recorded meanwhile). Other
            # errors but a full disk (EPERM, EOPNOTSUPP, ...) mean no hard links on this
            # filesystem (the temporary file was just written there): O_EXCL instead.
            if exc.errno in _SPACE_ERRNOS or isinstance(exc, FileNotFoundError):
                raise
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, tmp.read_bytes())
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse(raw: bytes | None) -> dict[str, Any] | None:
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def stale(self, info: dict[str, Any] | None, now: float | None = None) -> bool:
        """Whether a lock with content ``info`` (None: unreadable) may be taken over."""
        if info is None:
            return True  # locks are written whole: an unreadable one is damaged
        now = time.time() if now is None else now
        try:
            if info.get("host") == _HOST:
                pid = int(info["pid"])
                if pid == os.getpid():
                    with _LIVE_GUARD:
                        return info.get("token") not in _LIVE_TOKENS
                return not _pid_alive(pid, info.get("pid_start"))
            return float(info["expires"]) < now
        except (KeyError, TypeError, ValueError):
            return True

    def acquire(self) -> bool:
        """Claim the cell; True if this runner now holds it. False: another runner does
        (:attr:`holder` says which)."""
        self.holder, self.took_over = None, None
        self._started = time.time()
        for _ in range(5):
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                created = self._create()
            except FileNotFoundError:
                # Another runner recorded the cell and removed its folder between the mkdir
                # and the lock: make the folder again and claim it (the caller then finds
                # the cell recorded and lets it go).
                continue
            if created:
                self.held = True
                with _LIVE_GUARD:
                    _LIVE_TOKENS.add(self.token)
                return True
            raw = self._read(self.path)
            if raw is None:
                continue  # released in between: try again
            info = self._parse(raw)
            if not self.stale(info):
                self.holder = info
                return False
            aside = self.folder / f".{LOCK_NAME}.{self.token}.stale"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue  # another runner moved it first
            moved = self._read(aside)
            if moved != raw:  # not the stale lock we judged: a fresh one, put it back
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                self.holder = self._parse(moved)
                return False
            aside.unlink(missing_ok=True)
            self.took_over = info or {}
        self.holder = self._parse(self._read(self.path))
        return False

    def owned(self) -> bool:
        """True while the lock file is this runner's."""
        info = self._parse(self._read(self.path))
        return self.held and info is not None and info.get("token") == self.token

    def renew(self) -> bool:
        """Extend the lease (the heartbeat); False if the lock is no longer this runner's (it
        was taken over after this runner stopped renewing it, or deleted)."""
        if not self.owned():
            return False
        os.replace(self._write_tmp(), self.path)
        return True

    def release(self) -> None:
        """Remove the lock if it is still this runner's."""
        if self.owned():
            self.path.unlink(missing_ok=True)
        self.forget()

    def forget(self) -> None:
        """Stop holding the lock without touching the file (e.g. after removing the folder)."""
        self.held = False
        with _LIVE_GUARD:
            _LIVE_TOKENS.discard(self.token)


def describe_holder(info: dict[str, Any] | None) -> str:
    """``host pid N (lease until HH:MM:SS)`` for a lock's content."""
    if not info:
        return "another runner"
    expires = info.get("expires")
    until = (time.strftime("%H:%M:%S", time.localtime(float(expires)))
             if isinstance(expires, (int, float)) else "?")
    return f"{info.get('host', '?')} pid {info.get('pid', '?')} (lease until {until})"
