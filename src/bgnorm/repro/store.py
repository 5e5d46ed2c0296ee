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

Cell identity: :func:`cell_id` hashes the canonical JSON of a cell's config, excluding the
``"runtime"`` sub-dict (data paths, loader workers: how a cell is run, not what it computes), so
the same cell run from two machines with different mount points is recognized as the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .api import Record

try:  # POSIX advisory locks; without them (Windows) appends are still one write each.
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RUNTIME_KEY",
    "SCHEMA_VERSION",
    "ResultStore",
    "canonical_json",
    "cell_id",
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


def cell_id(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit id of a cell config (``config["runtime"]`` excluded)."""
    identity = {k: v for k, v in config.items() if k != RUNTIME_KEY}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


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


def run_meta(**extra: Any) -> dict[str, Any]:
    """Provenance saved with each record: host, versions, time (plus ``extra``)."""
    import platform

    import torch

    meta: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
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
            os.write(fd, line)
            os.fsync(fd)
            return True
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
