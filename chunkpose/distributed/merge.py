"""Rank 0's last step: shard records in unit order -> the caller's merge -> one published folder.

The merge function is the caller's (the CLI writes the same results CSV, ob_in_cam tree and
report.json as a single-process run); this module orders the records, adds the per-rank
summary, and publishes the folder only once it is complete (chunkpose.io.results.OutputDir:
a temporary sibling renamed into place). A digest of the records that went into the last
publication is kept in the parts folder, so rerunning a finished command changes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from chunkpose.distributed.shards import MERGED_NAME, ShardError, best_record, read_json, write_json_atomic
from chunkpose.io.results import OutputDir, to_jsonable


def ordered_records(units: list[str], found: dict[str, list[dict]], parts: Path) -> list[dict]:
    """One record per unit, in the order of ``units``, with "files" as an absolute Path (or None).

    Args:
        units: every unit id of the run, in output order.
        found: {unit id: [records]} as shards.read_records returns it.
        parts: the parts folder ("files" of a record is relative to it).

    Returns:
        list of record dicts (the best record of each unit, see shards.best_record), each with
        "index" (its position in ``units``) and "files" (Path or None).

    Raises:
        ShardError: a unit has no record although every rank said it was done, which means
            a rank's shard is not visible here (the parts folder is not on a shared filesystem).
    """
    records, missing = [], []
    for index, unit in enumerate(units):
        best = best_record(found.get(unit))
        if best is None:
            missing.append(unit)
            continue
        record = dict(best, index=index)
        record["files"] = None if best.get("files") is None else parts / best["files"]
        records.append(record)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ShardError(
            f"{len(missing)} unit(s) have no record in {parts} although all ranks finished ({shown}); "
            "with several nodes the output folder must be on a filesystem every node shares "
            "(choose such an --out), then rerun the same command to redo only those units")
    return records


def records_digest(records: list[dict]) -> str:
    """A fingerprint of what a merge would publish (which record of which unit, and its content).

    Args:
        records: ordered_records() output.

    Returns:
        str: SHA-256 hex digest.
    """
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(to_jsonable(record), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def _rank_entry(rank: int, records: list[dict], session: dict | None) -> dict:
    done = [r for r in records if r.get("status") == "done"]
    busy = sum(float(r.get("seconds") or 0.0) for r in records)
    peaks = [int(r["peak_bytes"]) for r in records if r.get("peak_bytes") is not None]
    last = max(records, key=lambda r: r.get("finished_at") or 0.0) if records else {}
    entry = {
        "rank": rank,
        "host": (session or {}).get("host", last.get("host")),
        "device": (session or {}).get("device", last.get("device")),
        "units": len(records),
        "done": len(done),
        "failed": len(records) - len(done),
        "busy_seconds": busy,
        # units per second of the time spent in units (waiting at the end is not counted)
        "units_per_second": (len(records) / busy) if busy > 0 else None,
        "peak_bytes": max(peaks) if peaks else None,
    }
    if session is not None:
        wall = float(session.get("wall_seconds") or 0.0)
        entry["this_session"] = {
            "units": session.get("units", 0), "skipped_finished": session.get("skipped", 0),
            "wall_seconds": wall,
            "units_per_second": (session.get("units", 0) / wall) if wall > 0 else None,
        }
    return entry


def build_summary(records: list[dict], sessions: dict[int, dict], context_info: dict, wall_seconds: float) -> dict:
    """The per-rank and overall numbers that go into the report.

    Args:
        records: the merged records (unit order).
        sessions: {rank: that rank's stats of this session} for the ranks of this session.
        context_info: world_size, backend (of this session).
        wall_seconds: rank 0's wall time of this session, start to all ranks finished.

    Returns:
        {"world_size", "backend", "units_total", "units_done", "units_failed", "failed": [...],
         "sessions", "wall_seconds", "units_per_second", "ranks": [per-rank entries]}.
        A per-rank entry counts the units that rank number did over all sessions (a resumed
        run's units are where they were done) and, for ranks of this session, "this_session".
    """
    by_rank: dict[int, list[dict]] = {}
    for record in records:
        by_rank.setdefault(int(record.get("rank", 0)), []).append(record)
    ranks = sorted(set(by_rank) | set(sessions))
    failed = [{"unit": r["unit"], "error_type": (r.get("error") or {}).get("type"),
               "error": (r.get("error") or {}).get("message")} for r in records if r.get("status") != "done"]
    this_session_units = sum(int(s.get("units", 0)) for s in sessions.values())
    return {
        "world_size": context_info.get("world_size"),
        "backend": context_info.get("backend"),
        "units_total": len(records),
        "units_done": len(records) - len(failed),
        "units_failed": len(failed),
        "failed": failed,
        "sessions": len({r.get("session") for r in records}),
        "wall_seconds": wall_seconds,
        "units_per_second": (this_session_units / wall_seconds) if wall_seconds > 0 else None,
        "ranks": [_rank_entry(r, by_rank.get(r, []), sessions.get(r)) for r in ranks],
    }


def publish(records: list[dict], merge, out_dir, parts: Path, summary: dict) -> dict:
    """Run the caller's merge into a temporary folder and move it into place at ``out_dir``.

    Skipped (nothing is touched) when ``out_dir`` already holds the publication of exactly
    these records, which makes rerunning a finished command a no-op.

    Args:
        records: ordered_records() output.
        merge: ``merge(records, final_dir, summary)`` writing every output file into final_dir.
        out_dir: the final output folder.
        parts: the parts folder (merged.json is kept there).
        summary: build_summary() output, handed to merge for its report.

    Returns:
        The summary of the publication in place (the earlier one when skipped), with
        "published": True when this call wrote the folder, False when it was up to date.
    """
    digest = records_digest(records)
    marker = parts / MERGED_NAME
    final = Path(out_dir).expanduser().resolve()
    if marker.is_file() and final.is_dir():
        held = read_json(marker)
        if held.get("digest") == digest and held.get("out") == str(final):
            return {**held["summary"], "published": False}
    od = OutputDir(final)
    with od as tmp:
        merge(records, tmp, summary)
        od.commit()
    write_json_atomic(marker, {"digest": digest, "out": str(final), "summary": summary})
    return {**summary, "published": True}


def copy_unit_files(record: dict, dest, link: bool = False) -> list[Path]:
    """Copy (or hard-link) a unit's shard files into ``dest``, keeping their relative paths.

    Merge functions must not move or edit shard files: a rerun merges from them again.

    Args:
        record: a merged record ("files" is the unit's shard folder or None).
        dest: the folder to copy into (created).
        link: hard-link instead of copying where the filesystem allows (saves the space of
            large outputs; shard files are never rewritten in place, so sharing is safe).

    Returns:
        The paths written under dest.
    """
    src = record.get("files")
    if src is None:
        return []
    src, dest = Path(src), Path(dest)
    written = []
    for path in sorted(src.rglob("*")):
        if path.is_dir():
            continue
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(path, target)
            except OSError:  # another filesystem, or links not supported: copy instead
                shutil.copy2(path, target)
        else:
            shutil.copy2(path, target)
        written.append(target)
    return written


__all__ = ["build_summary", "copy_unit_files", "ordered_records", "publish", "records_digest"]
