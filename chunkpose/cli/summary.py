"""How a run ends: report.json, the summary on the terminal (rich tables) and the --json line."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from chunkpose.cli.calls import budget_bytes

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def summarize(records, budget, interrupted, total_time, extra=None) -> dict:
    """Frames done, peak against the budget, downscale, and pose accuracy when there is
    ground truth (ADD / ADD-S means and AUCs, recall at 0.1 diameter)."""
    from chunkpose.metrics import auc, recall_at_diameter

    peaks = [r["peak_bytes"] for r in records if r.get("peak_bytes") is not None]
    factors = [r["downscale_factor"] for r in records if r.get("downscale_factor") is not None]
    s = {
        "frames_done": len(records),
        "interrupted": interrupted,
        "total_time_s": total_time,
        "peak_bytes": max(peaks) if peaks else None,
        "budget_bytes": budget,
        "within_budget": (max(peaks) <= budget) if peaks and budget else None,
        "downscale_factor": min(factors) if factors else None,
    }
    with_gt = [r for r in records if "add" in r]
    if with_gt:
        add = [r["add"] for r in with_gt]
        adds = [r["add_s"] for r in with_gt]
        s.update({"add_mean": float(np.mean(add)), "add_s_mean": float(np.mean(adds)),
                  "add_auc": auc(add), "adds_auc": auc(adds)})
        diam = [r.get("diameter") for r in with_gt]
        if all(d for d in diam):
            s["add_recall_0.1d"] = recall_at_diameter(add, diam)
            s["adds_recall_0.1d"] = recall_at_diameter(adds, diam)
            s["add_or_adds_recall_0.1d"] = recall_at_diameter([r["add_or_adds"] for r in with_gt], diam)
    if extra:
        s.update(extra)
    return s


def _bytes(n):
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _score(x):
    return "-" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _mm(x):
    return "-" if x is None else f"{x * 1000:.1f}"


def _console(to_stderr):
    from rich.console import Console

    return Console(file=sys.stderr if to_stderr else sys.stdout, width=120)


def print_summary(records, summary, title, to_stderr):
    from rich.table import Table

    console = _console(to_stderr)
    table = Table(title=title)
    for col in ("frame", "stage", "score", "ADD mm", "ADD-S mm", "rot deg", "time s", "peak", "downscale"):
        table.add_column(col, justify="right" if col not in ("frame", "stage") else "left")
    shown = records if len(records) <= 40 else records[:20] + records[-20:]
    for r in shown:
        table.add_row(
            str(r["frame"]), r.get("stage", ""), _score(r.get("score")), _mm(r.get("add")), _mm(r.get("add_s")),
            "-" if r.get("rot_deg") is None else f"{r['rot_deg']:.2f}", f"{r['time_s']:.2f}",
            _bytes(r.get("peak_bytes")), f"{r.get('downscale_factor') or 1.0:g}",
        )
    console.print(table)
    lines = [f"frames: {summary['frames_done']}" + (" (interrupted)" if summary["interrupted"] else ""),
             f"peak memory: {_bytes(summary.get('peak_bytes'))} of budget {_bytes(summary.get('budget_bytes'))}"
             + {True: " (within budget)", False: " (OVER BUDGET)"}.get(summary.get("within_budget"), "")]
    if summary.get("downscale_factor") not in (None, 1, 1.0):
        lines.append(f"downscaled by the engine: factor {summary['downscale_factor']:g} (budget too small for full resolution)")
    if "add_auc" in summary:
        lines.append(f"ADD AUC {summary['add_auc']:.3f}, ADD-S AUC {summary['adds_auc']:.3f}; mean ADD "
                     f"{summary['add_mean'] * 1000:.1f} mm, ADD-S {summary['add_s_mean'] * 1000:.1f} mm")
    if "out" in summary:
        lines.append(f"outputs: {summary['out']}")
    for line in lines:
        console.print(line, markup=False, highlight=False)


def print_chunk_plan(plan: dict, to_stderr):
    """The engine's per-stage chunk plan of the registration call, as a table."""
    if not plan:
        return
    from rich.table import Table

    table = Table(title="chunk plan (registration)")
    for col in ("stage", "items", "chunk sizes", "peak", "predicted", "retries", "time s"):
        table.add_column(col, justify="left" if col in ("stage", "chunk sizes") else "right")
    for name, st in plan.items():
        table.add_row(name, str(st.get("items", "-")), str(st.get("chunk_sizes", "-")), _bytes(st.get("peak_bytes")),
                      _bytes(st.get("predicted_peak_bytes")), str(st.get("retries", "-")),
                      "-" if st.get("wall_s") is None else f"{st['wall_s']:.2f}")
    _console(to_stderr).print(table)


def json_line(command, out, records, summary, extra=None) -> str:
    from chunkpose.io.results import to_jsonable

    frames = [{k: r.get(k) for k in ("frame", "stage", "obj_id", "pose", "score", "time_s", "peak_bytes",
                                      "downscale_factor", "add", "add_s", "rot_deg", "trans_m") if k in r}
              for r in records]
    obj = {"command": command, "out": str(out), "frames": frames, **summary}
    if extra:
        obj.update(extra)
    return json.dumps(to_jsonable(obj), separators=(",", ":"))


def head(args, command, device, **more) -> dict:
    """The top of report.json: what ran, where, with which settings."""
    from chunkpose import __version__

    return {"chunkpose_version": __version__, "command": command, "argv": sys.argv[1:], "device": device,
            "budget_gb": args.budget_gb, "budget_bytes": budget_bytes(args),
            "refine_iterations": args.refine_iters, "track_iterations": args.track_iters, **more}


def finish(args, od, tmp, command, state, report_head, title, plan=None, extra_json=None) -> int:
    """Write report.json, move the folder into place, print the summary (and --json)."""
    from chunkpose.io.results import write_json

    total = time.perf_counter() - state.started
    summary = summarize(state.records, budget_bytes(args), state.interrupted, total)
    summary["out"] = str(od.final)
    write_json(tmp / "report.json", {**report_head, "summary": summary, "frames": state.records})
    od.commit()
    if plan:
        print_chunk_plan(plan, to_stderr=args.json)
    print_summary(state.records, summary, title, to_stderr=args.json)
    if args.json:
        sys.stdout.flush()
        print(json_line(command, od.final, state.records, summary, extra_json))
    return EXIT_INTERRUPTED if state.interrupted else EXIT_OK
