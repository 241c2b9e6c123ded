"""Dataset-parallel runs: ranks claim whole units from a shared counter, shard, then rank 0 merges.

A unit is one piece of work that must stay on one rank: a whole BOP image (its CSV time is
one value) or a whole video (tracking is sequential). Every rank walks the same ordered
list; the next index comes from ``store.add(counter, 1)``, so a fast rank simply claims
more and a slow one never holds the others up. A unit that raises is recorded as failed
and the rank goes on; a rank that dies loses only the unit it was on, because every
finished unit is already durable in its shard. Rerunning the same command (or torchrun's
--max-restarts) skips the units the shards hold and redoes the rest.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from chunkpose.distributed.context import DEFAULT_STALL_S, RankContext
from chunkpose.distributed.merge import build_summary, ordered_records, publish
from chunkpose.distributed.shards import RankShard, check_run_key, is_finished, parts_dir_for, read_records
from chunkpose.io.results import OutputDir, to_jsonable

#: How long rank 0 waits, after publishing the merge, for the other ranks to read it.
READ_WAIT_S = 60.0

ProcessFn = Callable[[str, Path, "object"], dict]
MergeFn = Callable[[list, Path, dict], None]


class RunAborted(RuntimeError):
    """Another rank could not start or merge; ``str`` carries its message."""


def _validate_units(units: Iterable[str]) -> list[str]:
    units = list(units)
    bad = [u for u in units if not isinstance(u, str) or not u]
    if bad:
        raise TypeError(f"units must be non-empty strings, got {bad[:3]!r} (give each unit a string id)")
    seen, dupes = set(), []
    for u in units:
        if u in seen:
            dupes.append(u)
        seen.add(u)
    if dupes:
        raise ValueError(f"units must be unique, {len(dupes)} repeat(s) such as {dupes[0]!r} (give each unit its own id)")
    return units


def _units_digest(units: list[str]) -> str:
    return hashlib.sha256("\n".join(units).encode()).hexdigest()


def _peak_reset(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_read(device, result: dict) -> int | None:
    """The unit's peak bytes: what the process function reported, else the CUDA allocator's peak."""
    if result.get("peak_bytes") is not None:
        return int(result["peak_bytes"])
    if getattr(device, "type", None) == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return None


def _tell_the_others(ctx: RankContext, key: str, verdict: dict) -> None:
    """Rank 0: publish a verdict the others end on, and stay until they have read it (each
    adds 1 to ``<key>/read``). Without torchrun's agent rank 0's process hosts the store, so
    a rank still reading when rank 0 exits would see its connection reset. A rank that died
    meanwhile is not waited for past READ_WAIT_S."""
    ctx.publish(key, verdict)
    deadline = time.monotonic() + READ_WAIT_S
    while ctx.world_size > 1 and time.monotonic() < deadline:
        if ctx.store.add(f"{key}/read", 0) >= ctx.world_size - 1:
            return
        time.sleep(0.05)


def _start(ctx: RankContext, ns: str, units: list[str], out_dir: Path, parts: Path, run_key) -> str:
    """Rank 0 checks that all ranks agree and that the folders are usable; returns the session id.

    Everything a rank could refuse is decided once, by rank 0, and the verdict reaches every
    rank through the store, so either all ranks start or all raise the same error.
    """
    hello = {"host": ctx.host, "pid": os.getpid(), "device": str(ctx.device), "units": _units_digest(units),
             "count": len(units)}
    ctx.publish(f"{ns}/hello/{ctx.rank}", hello)
    if ctx.is_main:
        verdict = {"ok": True, "session": uuid.uuid4().hex}
        try:
            hellos = ctx.wait_for({r: f"{ns}/hello/{r}" for r in range(ctx.world_size)}, what="all ranks to start")
            differ = {r: h for r, h in hellos.items() if h["units"] != hello["units"]}
            if differ:
                r, h = next(iter(differ.items()))
                raise ValueError(f"ranks disagree on the work list: rank 0 has {len(units)} units, rank {r} "
                                 f"(host {h['host']}) has {h['count']} or others (every rank must see the same "
                                 "dataset at the same path with the same options)")
            OutputDir(out_dir)  # refuses an unusable --out before any work is done
            check_run_key(parts, run_key)
        except Exception as e:
            _tell_the_others(ctx, f"{ns}/start", {"ok": False, "error": f"{type(e).__name__}: {e}"})
            raise
        ctx.publish(f"{ns}/start", verdict)  # the others go on working: nothing to wait for
        return verdict["session"]
    verdict = ctx.wait_for([f"{ns}/start"], what="rank 0 to start the run")[0]
    ctx.store.add(f"{ns}/start/read", 1)
    if not verdict["ok"]:
        raise RunAborted(f"rank 0 refused to start: {verdict['error']}")
    return verdict["session"]


def _run_one(unit: str, index: int, process: ProcessFn, shard: RankShard, ctx: RankContext, session: str) -> dict:
    """Do one unit and make its outcome durable; an exception becomes a failed record."""
    scratch = shard.scratch_for(unit)
    _peak_reset(ctx.device)
    started = time.time()
    t0 = time.perf_counter()
    try:
        result = process(unit, scratch, ctx.device)
        error = None
    except Exception as e:  # a bad unit must not stop the rank; KeyboardInterrupt etc. still do
        result = None
        error = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc(limit=20)}
    seconds = time.perf_counter() - t0
    if error is None:
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise TypeError(f"process({unit!r}, ...) returned {type(result).__name__}; it must return a dict "
                            "(the unit's record, JSON-serialisable)")
    record = {
        "unit": unit, "index": index, "status": "done" if error is None else "failed",
        "result": None if result is None else to_jsonable(result), "error": error,
        "rank": ctx.rank, "host": ctx.host, "device": str(ctx.device), "session": session,
        "restart_count": ctx.restart_count, "seconds": seconds, "started_at": started, "finished_at": time.time(),
        "peak_bytes": None if result is None else _peak_read(ctx.device, result),
    }
    return shard.commit(record, scratch)


def run_units(units: Iterable[str], process: ProcessFn, merge: MergeFn, out_dir, context: RankContext | None = None,
              *, run_key=None, parts_dir=None, retry_failed: bool = False, keep_parts: bool = True,
              timeout_s: float | None = None, stall_s: float = DEFAULT_STALL_S,
              on_unit: Callable[[dict], None] | None = None) -> dict:
    """Do every unit exactly once across all ranks and publish the merged output folder.

    Call it on every rank with the same arguments (under torchrun, or in one plain process).

    Args:
        units: unit ids in a deterministic order (the same list on every rank; checked).
        process: ``process(unit_id, scratch_dir, device) -> dict`` does one unit. Files it
            writes into scratch_dir (empty, private to the unit) are kept with its record; the
            dict it returns (JSON-serialisable; numpy/torch values are converted, NaN becomes
            None) is the record's "result". A "peak_bytes" key there is the unit's peak memory
            (otherwise the CUDA allocator's peak on a CUDA device). An exception marks the unit
            failed with its type and message; the rank goes on with the next unit.
        merge: ``merge(records, final_dir, summary)``, run on rank 0 once every unit is done:
            writes all outputs into final_dir (a temporary folder moved to out_dir afterwards).
            records are in unit order, one per unit: {"unit", "index", "status" ("done" or
            "failed"), "result", "error" ({"type", "message", "traceback"} or None), "files"
            (absolute Path of the unit's files, or None), "rank", "host", "device", "session",
            "seconds", "peak_bytes", ...}. Shard files are read-only to merge (copy or link:
            see merge.copy_unit_files). summary is the per-rank summary (see build_summary).
        out_dir: the final output folder (chunkpose.io.results.OutputDir rules: an existing folder
            is replaced only if it holds a chunkpose report.json).
        context: the RankContext to use (default: from the environment; then it is also closed here).
        run_key: JSON-able settings that make a run what it is (model, budget, options); shards
            written under another run_key are refused instead of mixed in.
        parts_dir: where the shards go (default ``<out_dir>.parts``); must be shared by all nodes.
        retry_failed: redo units whose record says failed (default: they stay failed).
        keep_parts: keep the shards after publishing (default) so that a rerun is a no-op; with
            False they are deleted and a rerun starts over.
        timeout_s: the most seconds a rank waits at the end for the others to finish (default:
            no limit while their heartbeats say they are alive; a video can take hours).
        stall_s: a rank whose heartbeat stopped this long is given up as dead (named in the error).
        on_unit: called with each record this rank finishes (progress display).

    Returns:
        The summary (same on every rank): world_size, backend, units_total/done/failed,
        failed [{unit, error_type, error}], wall_seconds, units_per_second, ranks [per rank:
        units, done, failed, busy_seconds, units_per_second, peak_bytes, this_session], plus
        "published" (False when the output was already up to date) and "this_rank" (what
        this rank did in this call: units, skipped).

    Raises:
        RanksDidNotArrive: a rank did not finish within timeout_s, or stopped beating (it is named).
        RunAborted: rank 0 refused to start or failed to merge (on the other ranks).
        LaunchError: (an InputError) without ``context``, the launch environment cannot be used.
        OutputFolderError: (rank 0, an InputError) ``out_dir`` cannot be used.
        ShardError: (rank 0) the parts folder holds another run's shards, or a unit's record is missing
            at the merge.
        TypeError: a unit id is not a non-empty string, or ``process`` returned something other than
            a dict.
        ValueError: unit ids repeat, or (rank 0) the ranks disagree on the unit list.
    """
    units = _validate_units(units)
    out = Path(out_dir).expanduser().resolve()
    parts = Path(parts_dir).expanduser().resolve() if parts_dir is not None else parts_dir_for(out)
    own_context = context is None
    ctx = RankContext.from_env() if own_context else context
    ctx.init()
    try:
        run = _UnitRun(ctx=ctx, units=units, process=process, merge=merge, out=out, parts=parts,
                       retry_failed=retry_failed, keep_parts=keep_parts, timeout_s=timeout_s, stall_s=stall_s,
                       on_unit=on_unit)
        return run.execute(run_key)
    finally:
        if own_context:
            ctx.close()


@dataclass
class _UnitRun:
    """One run_units call on one rank (the arguments, plus the store keys of this call)."""

    ctx: RankContext
    units: list
    process: ProcessFn
    merge: MergeFn
    out: Path
    parts: Path
    retry_failed: bool
    keep_parts: bool
    timeout_s: float | None
    stall_s: float
    on_unit: Callable[[dict], None] | None
    ns: str = ""
    session: str = ""
    t_start: float = 0.0

    def beat_key(self, rank: int) -> str:
        return f"{self.ns}/heartbeat/{rank}"

    def execute(self, run_key) -> dict:
        self.t_start = time.perf_counter()
        self.ns = self.ctx.namespace("run_units")
        self.session = _start(self.ctx, self.ns, self.units, self.out, self.parts, run_key)
        # While this rank works (and, for rank 0, merges), its heartbeat tells the waiting ranks
        # it is alive, so no fixed timeout has to outlast the longest unit.
        with self.ctx.heartbeat(self.beat_key(self.ctx.rank)):
            stats = self.claim_all()
            self.ctx.publish(f"{self.ns}/done/{self.ctx.rank}", stats)
            this_rank = {"units": stats["units"], "skipped": stats["skipped"]}
            summary = self.merge_all() if self.ctx.is_main else self.wait_for_merge()
        return {**summary, "this_rank": this_rank}

    def claim_all(self) -> dict:
        """Claim indices from the shared counter until the list is exhausted; returns this rank's stats."""
        ctx = self.ctx
        shard = RankShard(self.parts, ctx.rank)
        shard.prepare()
        # Finished units are read once, after this rank's prepare() removed only its own
        # unrecorded leftovers; each index is claimed by exactly one rank, so a unit finished
        # meanwhile by someone else is never claimed twice either.
        found = read_records(self.parts)
        finished = {u for u in self.units if is_finished(found.get(u), self.retry_failed)}
        stats = {"rank": ctx.rank, "host": ctx.host, "device": str(ctx.device), "session": self.session,
                 "units": 0, "done": 0, "failed": 0, "skipped": 0, "busy_seconds": 0.0, "peak_bytes": None,
                 "wall_seconds": 0.0, "current": None}

        def save():
            shard.write_stats({**stats, "wall_seconds": time.perf_counter() - self.t_start})

        while True:
            index = ctx.store.add(f"{self.ns}/next", 1) - 1
            if index >= len(self.units):
                break
            unit = self.units[index]
            if unit in finished:
                stats["skipped"] += 1
                continue
            stats["current"] = unit
            save()
            record = _run_one(unit, index, self.process, shard, ctx, self.session)
            stats["units"] += 1
            stats["done" if record["status"] == "done" else "failed"] += 1
            stats["busy_seconds"] += record["seconds"]
            if record.get("peak_bytes") is not None:
                stats["peak_bytes"] = max(stats["peak_bytes"] or 0, record["peak_bytes"])
            stats["current"] = None
            save()
            if self.on_unit is not None:
                self.on_unit(record)
        stats["wall_seconds"] = time.perf_counter() - self.t_start
        shard.write_stats(stats)
        return stats

    def merge_all(self) -> dict:
        """Rank 0: wait until every rank is done, merge the shards, publish; tell the others."""
        ctx = self.ctx
        try:
            ranks = range(ctx.world_size)
            sessions = ctx.wait_for({r: f"{self.ns}/done/{r}" for r in ranks}, self.timeout_s,
                                    what="all ranks to finish their units",
                                    heartbeats={r: self.beat_key(r) for r in ranks}, stall_s=self.stall_s)
            records = ordered_records(self.units, read_records(self.parts), self.parts)
            wall = time.perf_counter() - self.t_start
            summary = build_summary(records, sessions, {"world_size": ctx.world_size, "backend": ctx.backend}, wall)
            summary = publish(records, self.merge, self.out, self.parts, summary)
            if not self.keep_parts:
                shutil.rmtree(self.parts, ignore_errors=True)
        except BaseException as e:
            _tell_the_others(ctx, f"{self.ns}/merged", {"ok": False, "error": f"{type(e).__name__}: {e}"})
            raise
        _tell_the_others(ctx, f"{self.ns}/merged", {"ok": True, "summary": summary})
        return summary

    def wait_for_merge(self) -> dict:
        """Other ranks: wait for rank 0's merge and return its summary (or raise its error)."""
        verdict = self.ctx.wait_for({0: f"{self.ns}/merged"}, self.timeout_s, what="rank 0 to merge the shards",
                                    heartbeats={0: self.beat_key(0)}, stall_s=self.stall_s)[0]
        self.ctx.store.add(f"{self.ns}/merged/read", 1)
        if not verdict["ok"]:
            raise RunAborted(f"rank 0 failed to merge the shards: {verdict['error']}")
        return verdict["summary"]


__all__ = ["MergeFn", "ProcessFn", "RunAborted", "run_units"]
