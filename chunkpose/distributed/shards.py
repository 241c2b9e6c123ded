"""Per-rank shards: what each rank finished, written so that a crash never leaves half of it.

Layout under the parts folder (by default ``<out>.parts`` next to the output folder):

    run.json                     the run's key (settings fingerprint); a different run refuses to resume here
    merged.json                  digest and summary of the last published merge (a rerun with nothing new is a no-op)
    rank-<r>/records/<key>.json  one record per finished unit (done or failed), written atomically
    rank-<r>/files/<key>/        the files that unit produced (moved in from its scratch folder)
    rank-<r>/scratch/<key>/      the unit in progress; removed when rank r starts again
    rank-<r>/stats.json          live per-rank counters of the current session

The record is written after the unit's files were moved into ``files/``, so a record always
means "complete"; files without a record (a crash between the two renames) are an orphan
that is removed and redone. ``<key>`` is the unit id made filename-safe plus a hash of the
id, so two ids never share a key. Every rank writes only below its own ``rank-<r>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from chunkpose.io.results import to_jsonable

RECORD_VERSION = 1
PARTS_SUFFIX = ".parts"
RUN_NAME = "run.json"
MERGED_NAME = "merged.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ShardError(ValueError):
    """A parts folder cannot be used; ``str`` is "<what> (<how to fix>)"."""


def parts_dir_for(out_dir) -> Path:
    """The default parts folder of an output folder: ``<out>.parts`` beside it.

    Args:
        out_dir: the output folder (``~`` expanded, made absolute).

    Returns:
        Path.
    """
    out = Path(out_dir).expanduser().resolve()
    return out.parent / f"{out.name}{PARTS_SUFFIX}"


def unit_key(unit_id: str) -> str:
    """A filename for a unit id: readable part + 12 hex digits of its SHA-1 (unique per id).

    Args:
        unit_id: the unit's id.

    Returns:
        str of filename-safe characters (at most 80 readable ones, then "-<hash>").
    """
    digest = hashlib.sha1(unit_id.encode("utf-8")).hexdigest()[:12]
    readable = _UNSAFE.sub("_", unit_id).strip("._")[:80]
    return f"{readable}-{digest}" if readable else digest


def write_json_atomic(path, data) -> Path:
    """Write JSON to a temporary file in the same folder, flush it to disk, then rename it over
    ``path``.

    Args:
        path: the file to write (its folder must exist).
        data: any value chunkpose.io.results.to_jsonable accepts.

    Returns:
        Path of the file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(to_jsonable(data), indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_json(path):
    """The parsed JSON of the file at ``path``.

    Args:
        path: the JSON file.

    Returns:
        The decoded value.
    """
    with open(path) as f:
        return json.load(f)


class RankShard:
    """The folder one rank writes: records, unit files, scratch and stats.

    Args:
        parts: the parts folder shared by all ranks.
        rank: the rank that owns this shard (the only writer below it).
    """

    def __init__(self, parts, rank: int):
        self.parts = Path(parts)
        self.rank = int(rank)
        self.root = self.parts / f"rank-{self.rank}"
        self.records_dir = self.root / "records"
        self.files_dir = self.root / "files"
        self.scratch_root = self.root / "scratch"
        self.stats_path = self.root / "stats.json"

    def prepare(self) -> None:
        """Create the folders and drop what an earlier crash of this rank left half done.

        Only this rank writes here, so cleaning it before claiming races with nobody: the scratch
        folder is emptied, interrupted temporary files removed, and unit files without a record
        deleted (those units are redone).
        """
        for folder in (self.records_dir, self.files_dir, self.scratch_root):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.scratch_root, ignore_errors=True)
        self.scratch_root.mkdir()
        for folder in (self.root, self.records_dir):  # a write killed before its rename
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        recorded = {p.stem for p in self.records_dir.glob("*.json")}
        for folder in self.files_dir.iterdir():
            if folder.name not in recorded:  # files moved in, record never written: redo the unit
                _remove(folder)

    def scratch_for(self, unit_id: str) -> Path:
        """An empty private folder for the unit about to run.

        Args:
            unit_id: the unit's id.

        Returns:
            Path of ``scratch/<key>`` (emptied if it existed).
        """
        scratch = self.scratch_root / unit_key(unit_id)
        _remove(scratch)
        scratch.mkdir(parents=True)
        return scratch

    def commit(self, record: dict, scratch: Path | None) -> dict:
        """Make a finished unit durable: its scratch files become ``files/<key>``, then the record.

        Args:
            record: the unit's record (must hold "unit"); "files" is filled in here.
            scratch: the unit's scratch folder; its files are kept only for a unit that is "done".

        Returns:
            The record as written (JSON types; "files" relative to the parts folder or None).
        """
        key = unit_key(record["unit"])
        files = None
        if scratch is not None and scratch.is_dir():
            if record.get("status") == "done" and any(scratch.iterdir()):
                dest = self.files_dir / key
                _remove(dest)
                os.replace(scratch, dest)
                files = dest.relative_to(self.parts).as_posix()
            else:
                _remove(scratch)
        record = {**record, "files": files, "version": RECORD_VERSION}
        write_json_atomic(self.records_dir / f"{key}.json", record)
        return to_jsonable(record)

    def write_stats(self, stats: dict) -> None:
        """Write this rank's live counters to stats.json (atomically).

        Args:
            stats: a JSON-able dict.
        """
        write_json_atomic(self.stats_path, stats)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_records(parts) -> dict[str, list[dict]]:
    """Every record in every rank's shard, {unit id: [records]} (more than one only after retries).

    Temporary files of an interrupted write start with "." and are not records.

    Args:
        parts: the parts folder.

    Returns:
        dict of unit id -> list of record dicts.

    Raises:
        ShardError: a record file cannot be read.
    """
    found: dict[str, list[dict]] = {}
    for path in sorted(Path(parts).glob("rank-*/records/*.json")):
        try:
            record = read_json(path)
        except (OSError, ValueError) as e:
            raise ShardError(f"unreadable shard record {path}: {e} (delete that file; its unit is redone)") from None
        found.setdefault(record.get("unit"), []).append(record)
    return found


def best_record(records: list[dict] | None) -> dict | None:
    """The record that counts for a unit: a done one over a failed one, then the latest.

    Args:
        records: the unit's records, or None.

    Returns:
        The record dict, or None when there is none.
    """
    if not records:
        return None
    return max(records, key=lambda r: (r.get("status") == "done", r.get("finished_at") or 0.0, r.get("rank", 0)))


def is_finished(records: list[dict] | None, retry_failed: bool) -> bool:
    """Whether a unit needs no more work: it has a done record, or a failed one and failures are
    not retried.

    Args:
        records: the unit's records, or None.
        retry_failed: whether failed units are run again.

    Returns:
        bool.
    """
    best = best_record(records)
    if best is None:
        return False
    return best.get("status") == "done" or not retry_failed


def check_run_key(parts: Path, run_key) -> None:
    """Record the run's key in a new parts folder, or refuse one written by a different run.

    Args:
        parts: the parts folder (created if needed).
        run_key: the run's settings fingerprint (JSON-able).

    Raises:
        ShardError: the folder holds shards of a run with another key.
    """
    path = parts / RUN_NAME
    wanted = to_jsonable(run_key)
    for tmp in parts.glob(".*.tmp"):  # rank 0 is the only writer here; a write it was killed in
        tmp.unlink(missing_ok=True)
    if path.is_file():
        held = read_json(path).get("run_key")
        if held != wanted:
            raise ShardError(
                f"{parts} holds the shards of a different run (its settings were {json.dumps(held)[:300]}, "
                f"now {json.dumps(wanted)[:300]}); rerun with the same settings to resume, or delete {parts} to start over")
        return
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"run_key": wanted, "version": RECORD_VERSION})


__all__ = [
    "MERGED_NAME", "PARTS_SUFFIX", "RECORD_VERSION", "RankShard", "ShardError", "best_record", "check_run_key",
    "is_finished", "parts_dir_for", "read_json", "read_records", "unit_key", "write_json_atomic",
]
