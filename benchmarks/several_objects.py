"""Several objects in one frame: one MultiObjectEstimator call per frame against one
PoseEstimator per object run one after another (what a user of upstream does), under the
same budgets, measured in one run with the two ways interleaved.

    python benchmarks/several_objects.py                    # 3072x2048, 3 objects, 252 hypotheses
    python benchmarks/several_objects.py --quick            # 320x240, 12 hypotheses

Per budget and way: registration and tracking seconds (median of the repeats), the frame's
peak (the largest single call's peak for the separate runs), how many depth pixels were
cleaned and how many refinement stages ran, ADD and ADD-S / diameter of every object after the
last tracked frame (the worst in the table). Writes
several_objects.{md,json,png} under benchmarks/results/<machine>/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_run_args, apply_quick, environment, header_lines, markdown_table,  # noqa: E402
                    measure_and_report, stamp_figure, write_markdown)

from chunkpose.metrics import add_error, adds_error  # noqa: E402

QUICK = {"width": 320, "height": 240, "hypotheses": 12, "repeats": 1, "budgets": "none,0.25", "tracked": 1}
OBJECTS = ("mug", "drill", "duck")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, QUICK)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--hypotheses", type=int, default=252)
    p.add_argument("--budgets", default="none,0.25", help="comma-separated GiB, 'none' = unbounded")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tracked", type=int, default=2, help="tracked frames after the registration")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    apply_quick(args, QUICK)
    return args


def _budget(text: str):
    return None if text.strip().lower() == "none" else float(text)


def _stage_counts(reports) -> dict:
    """Rows of depth the dense clean-ups filtered and refinement stages run, over a frame's reports."""
    def count(stage, what):
        return sum(getattr(r.stages[stage], what) for r in reports if stage in r.stages)

    return {"cleaned_rows": count("depth.erode", "items"), "refine_stages": count("refine.geometric", "calls")}


def _one_way(way: str, scene, budget, args) -> dict:
    from chunkpose.estimator import PoseEstimator
    from chunkpose.multi_object import MultiObjectEstimator

    kw = dict(budget_gb=budget, device=args.device, hypotheses=args.hypotheses)
    masks = {t.name: t.masks[0] for t in scene.objects}
    frames = range(1, 1 + args.tracked)
    if way == "one call per frame":
        est = MultiObjectEstimator({t.name: t.mesh for t in scene.objects}, **kw)
        t0 = time.perf_counter()
        results = est.register(scene.rgb[0], scene.depth[0], scene.K, masks)
        register_s = time.perf_counter() - t0
        reports, peak = [est.last_report], est.last_report.total_peak_bytes
        t0 = time.perf_counter()
        for k in frames:
            tracked = est.track(scene.rgb[k], scene.depth[k], scene.K)
            peak = max(peak, est.last_report.total_peak_bytes)
        track_s = (time.perf_counter() - t0) / max(1, len(frames))
    else:
        ests = {t.name: PoseEstimator(t.mesh, **kw) for t in scene.objects}
        t0 = time.perf_counter()
        results = {name: e.register(scene.rgb[0], scene.depth[0], scene.K, masks[name]) for name, e in ests.items()}
        register_s = time.perf_counter() - t0
        reports = [r.report for r in results.values()]
        peak = max(r.total_peak_bytes for r in reports)
        t0 = time.perf_counter()
        for k in frames:
            tracked = {name: e.track(scene.rgb[k], scene.depth[k], scene.K) for name, e in ests.items()}
            peak = max(peak, *(r.report.total_peak_bytes for r in tracked.values()))
        track_s = (time.perf_counter() - t0) / max(1, len(frames))
    last = frames[-1] if len(frames) else 0
    final = tracked if len(frames) else results
    errors = {t.name: {"add_over_d": add_error(final[t.name].pose, t.poses[last], t.mesh.vertices) / t.mesh.diameter,
                       "adds_over_d": adds_error(final[t.name].pose, t.poses[last], t.mesh.vertices) / t.mesh.diameter}
              for t in scene.objects}
    return {"register_s": register_s, "track_s": track_s, "peak_bytes": peak,
            "downscale": min(r.downscale_factor for r in reports), **_stage_counts(reports), "errors": errors,
            "max_add_over_d": max(e["add_over_d"] for e in errors.values()),
            "max_adds_over_d": max(e["adds_over_d"] for e in errors.values())}


def measure(args) -> dict:
    from chunkpose.synth import make_scene

    scene = make_scene(objects=list(OBJECTS), width=args.width, height=args.height, frames=1 + args.tracked,
                       seed=args.seed, distractors=0, footprint=0.05)
    ways = ("one call per frame", "one estimator per object")
    rows = []
    cases = [(b, w) for b in args.budgets.split(",") for w in ways]
    runs = {case: [] for case in cases}
    _one_way(ways[0], scene, None, argparse.Namespace(**{**vars(args), "tracked": 0, "hypotheses": 6}))  # warm up
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for case in cases:  # interleaved, so that drifts of a noisy machine hit both ways alike
            runs[case].append(_one_way(case[1], scene, _budget(case[0]), args))
    for (budget, way), measured in runs.items():
        row = {"budget": budget, "way": way, **measured[-1]}
        row["register_runs_s"] = [m["register_s"] for m in measured]
        row["track_runs_s"] = [m["track_s"] for m in measured]
        row["register_s"] = statistics.median(row["register_runs_s"])
        row["track_s"] = statistics.median(row["track_runs_s"])
        rows.append(row)
    settings = {k: getattr(args, k) for k in ("width", "height", "hypotheses", "budgets", "repeats", "tracked", "seed")}
    return {"environment": environment(args.device), "settings": settings, "records": rows}


def _worst(row: dict, key: str) -> str:
    """The largest error of the row's objects, with the object's name."""
    name, errors = max(row["errors"].items(), key=lambda item: item[1][key])
    return f"{errors[key]:.3g} ({name})"


def _paired(row: dict, other: dict, key: str) -> float:
    """Median over the repeats of row's time over other's in the same repeat (they ran back to back)."""
    return statistics.median(a / b for a, b in zip(row[key], other[key]))


def write_reports(payload: dict, out: Path, stem: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = payload["settings"], payload["records"]
    by = {(r["budget"], r["way"]): r for r in rows}
    table = []
    for r in rows:
        other = by[(r["budget"], "one estimator per object")]
        table.append([r["budget"], r["way"], r["register_s"], _paired(r, other, "register_runs_s"), r["track_s"],
                      _paired(r, other, "track_runs_s"), r["peak_bytes"] / 2**20, r["downscale"], r["cleaned_rows"],
                      r["refine_stages"], _worst(r, "add_over_d"), _worst(r, "adds_over_d")])
    lines = [f"# Several objects: {len(OBJECTS)} objects at {s['width']}x{s['height']}, {s['hypotheses']} hypotheses "
             f"each, one call per frame vs one estimator per object", "", *header_lines(payload["environment"]), "",
             f"Seconds are medians of {s['repeats']} interleaved repeats, ratios medians of each repeat's ratio; "
             f"tracking is per frame ({s['tracked']} frames). Peak: the frame's (one call) or the largest single object's call (separate). Cleaned rows: "
             "rows of depth the dense clean-ups filtered at registration. Refine stages: engine stages of the "
             "refiner at registration. Errors after the last tracked frame, against the synthetic ground truth.", "",
             markdown_table(["budget GiB", "way", "register s", "x separate", "track s/frame", "x separate",
                             "peak MiB", "downscale", "cleaned rows", "refine stages", "worst ADD / d",
                             "worst ADD-S / d"], table)]
    write_markdown(out / f"{stem}.md", lines)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    for i, way in enumerate(("one call per frame", "one estimator per object")):
        mine = [by[(b, way)] for b in budgets]
        xs = [j + 0.38 * i for j in range(len(budgets))]
        axes[0].bar(xs, [r["register_s"] for r in mine], width=0.36, label=way)
        axes[1].bar(xs, [r["peak_bytes"] / 2**20 for r in mine], width=0.36, label=way)
    for ax, label in zip(axes, ("registration s", "peak MiB")):
        ax.set_xticks([j + 0.19 for j in range(len(budgets))], [f"budget {b}" for b in budgets])
        ax.set_ylabel(label)
    axes[0].legend()
    stamp_figure(fig, payload["environment"])
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)
    return [out / f"{stem}.md", out / f"{stem}.png"]


def main(argv=None) -> int:
    args = parse_args(argv)
    measure_and_report("several_objects", args, measure, write_reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
