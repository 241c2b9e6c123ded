"""The same run spread over torchrun's ranks: ``torchrun --nproc-per-node=N -m chunkpose run ...``.

A command that sees torchrun's environment (RANK, WORLD_SIZE, ...) hands its work to
chunkpose.distributed.run_units: the units are whole BOP images or whole videos, claimed
dynamically from the store, each rank on its own device (cuda:LOCAL_RANK, or the CPU with
gloo) under its own ``--budget-gb``; every finished unit is durable in its rank's shard, so
rerunning the same command resumes; rank 0 merges the shards into the output folder a
single-process run writes (the same ob_in_cam/, vis/, results CSV and report.json), with
per-rank units, peak memory and throughput under "distributed" in report.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chunkpose.cli import summary
from chunkpose.cli.calls import budget_bytes

#: Exit code of a distributed run in which some units failed (their errors are in report.json).
EXIT_UNITS_FAILED = 1

#: Arguments that do not change what a run computes; all others make up its run key, and
#: shards written under another key are refused instead of mixed in.
_NOT_IN_RUN_KEY = {"out", "json", "debug"}


def rank_context(args):
    """The RankContext of this process when a launcher (torchrun, srun with the env:// variables)
    started it, else None (a plain single-process run)."""
    from chunkpose.distributed import RankContext

    ctx = RankContext.from_env(device=args.device)
    return ctx if ctx.launched else None


@dataclass
class UnitWork:
    """A command's work as units.

    Attributes:
        units: unit ids in a fixed order (every rank builds the same list).
        process: ``process(unit_id, scratch_dir) -> {"records": [report records], ...}``; the
            unit's files go into scratch_dir with the paths they have in the output folder.
        write_outputs: ``write_outputs(folder, results)`` writes what spans the units (a
            results CSV) from the units' results in unit order.
        head: the top of report.json (summary.head).
        title: the summary table's title.
    """

    units: list
    process: Callable[[str, Path], dict]
    write_outputs: Callable[[Path, list], None]
    head: dict
    title: str


def _run_key(args) -> dict:
    return {k: str(v) for k, v in sorted(vars(args).items()) if k not in _NOT_IN_RUN_KEY}


def run_on_ranks(args, ctx, work: UnitWork) -> int:
    """Do ``work`` across the ranks of ``ctx`` and, on rank 0, print the summary.

    Returns:
        EXIT_OK, or EXIT_UNITS_FAILED when some units failed (recorded with their errors).
    """
    from chunkpose.distributed import copy_unit_files, run_units
    from chunkpose.io.results import write_json

    final = Path(args.out).expanduser().resolve()

    def process(unit, scratch, device):
        result = work.process(unit, scratch)
        peaks = [r["peak_bytes"] for r in result["records"] if r.get("peak_bytes") is not None]
        return {**result, "peak_bytes": max(peaks) if peaks else None}

    def merge(records, folder, distributed):
        done = [r for r in records if r["status"] == "done"]
        for record in done:
            copy_unit_files(record, folder)
        frames = [f for r in done for f in r["result"]["records"]]
        work.write_outputs(folder, [r["result"] for r in done])
        run_summary = summary.summarize(frames, budget_bytes(args), False, distributed["wall_seconds"])
        run_summary.update(out=str(final), units_failed=distributed["units_failed"], failed_units=distributed["failed"])
        write_json(folder / "report.json", {**work.head, "summary": run_summary, "frames": frames,
                                            "distributed": distributed})

    done = run_units(work.units, process, merge, final, ctx, run_key=_run_key(args))
    if not ctx.is_main:
        return EXIT_UNITS_FAILED if done["units_failed"] else summary.EXIT_OK
    report = json.loads((final / "report.json").read_text())
    summary.print_summary(report["frames"], report["summary"], work.title, to_stderr=args.json)
    for entry in done["ranks"]:
        print(f"rank {entry.get('rank')}: {entry.get('units', 0)} units, peak "
              f"{(entry.get('peak_bytes') or 0) / 2**20:.0f} MiB", file=sys.stderr if args.json else sys.stdout)
    for failure in done["failed"]:
        print(f"chunkpose: unit {failure['unit']} failed: {failure['error_type']}: {failure['error']}", file=sys.stderr)
    if args.json:
        print(summary.json_line("run", final, report["frames"], report["summary"],
                                {"world_size": done["world_size"], "units_failed": done["units_failed"]}))
    return EXIT_UNITS_FAILED if done["units_failed"] else summary.EXIT_OK
