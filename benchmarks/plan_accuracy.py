"""Predicted against measured peaks, per stage and per call, for registration and tracking.

    python benchmarks/plan_accuracy.py                  # 3072x2048, geometric and learned
    python benchmarks/plan_accuracy.py --quick          # small smoke run, seconds

For each path (the weight-free geometric pair; the learned pair with random weights in the
upstream layout and the official 160 px crops) and for budgets of twice, half and a quarter
of the unbounded peak (never below what full resolution needs): one registration and two
tracked frames. Per stage the planner's predicted peak against the measured one, and per
call the estimator's what-if (PoseEstimator.estimate_peak_bytes, asked before the call)
against the call's measured peak. Peaks include what the renderer holds outside torch.
Writes a markdown table and the raw JSON under benchmarks/results/<machine>/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_common_args, apply_quick, environment, header_lines, markdown_table,  # noqa: E402
                    measure_and_report, write_markdown)
from _scenes import learned_pair, synthetic_frames  # noqa: E402

import chunkpose  # noqa: E402

MIB = 2**20
GIB = 2**30


def make_estimator(path: str, frames, budget_gb, args):
    if path == "geometric":
        return chunkpose.PoseEstimator(frames.mesh, budget_gb=budget_gb, device=args.device, hypotheses=args.hypotheses,
                                       refine_iterations=args.refine_iters)
    refiner, scorer = learned_pair(args.device, args.learned_crop)
    # random weights cannot track: no health checks, so tracked frames stay track calls
    return chunkpose.PoseEstimator(frames.mesh, budget_gb=budget_gb, device=args.device, refiner=refiner, scorer=scorer,
                                   hypotheses=args.learned_hypotheses, refine_iterations=args.learned_iters,
                                   health_threshold=None)


def _stage_rows(report, call: str) -> list[dict]:
    rows = []
    external = report.external_bytes
    for name, stage in report.stages.items():
        rows.append({"call": call, "stage": name, "chunks": stage.n_chunks,
                     "predicted_bytes": stage.predicted_peak_bytes + external if stage.predicted_peak_bytes else None,
                     "measured_bytes": stage.peak_bytes + external})
    return rows


def run_path(path: str, frames, args, progress) -> list[dict]:
    inputs = (frames.rgb[0], frames.depth[0], frames.K, frames.masks[0])
    probe = make_estimator(path, frames, None, args)
    unbounded = probe.register(*inputs).report.total_peak_bytes
    need = probe.required_budget_gb(*inputs) * GIB
    records = []
    for label, budget in (("2x unbounded peak", 2 * unbounded), ("1/2 unbounded peak", unbounded / 2),
                          ("1/4 unbounded peak", unbounded / 4)):
        budget = max(budget, 1.02 * need)
        progress.set_postfix_str(f"{path}, {label}")
        est = make_estimator(path, frames, budget / GIB, args)
        what_if = est.estimate_peak_bytes(*inputs)
        report = est.register(*inputs).report
        calls = [{"call": "register", "predicted_bytes": what_if, "measured_bytes": report.total_peak_bytes,
                  "stages": _stage_rows(report, "register")}]
        for i in (1, 2):
            what_if = est.estimate_peak_bytes(frames.rgb[i], frames.depth[i], frames.K)
            track = est.track(frames.rgb[i], frames.depth[i], frames.K).report
            calls.append({"call": f"track {i}", "predicted_bytes": what_if, "measured_bytes": track.total_peak_bytes,
                          "stages": _stage_rows(track, f"track {i}")})
        records.append({"path": path, "case": label, "budget_bytes": int(budget), "unbounded_peak_bytes": unbounded,
                        "downscale_factor": report.downscale_factor, "calls": calls})
        progress.update()
    return records


def _error(predicted, measured):
    return None if not predicted else round(100.0 * (predicted - measured) / measured, 1)


def table(records: list[dict]) -> str:
    columns = ["path", "budget", "call", "stage", "chunks", "predicted MiB", "measured MiB", "error %"]
    rows = []
    for r in records:
        budget = f"{r['case']} ({r['budget_bytes'] / MIB:.0f} MiB)"
        for call in r["calls"]:
            rows.append([r["path"], budget, call["call"], "(whole call: what-if)", None,
                         round(call["predicted_bytes"] / MIB, 1), round(call["measured_bytes"] / MIB, 1),
                         _error(call["predicted_bytes"], call["measured_bytes"])])
            for s in call["stages"]:
                rows.append([r["path"], budget, call["call"], s["stage"], s["chunks"],
                             None if s["predicted_bytes"] is None else round(s["predicted_bytes"] / MIB, 1),
                             round(s["measured_bytes"] / MIB, 1), _error(s["predicted_bytes"], s["measured_bytes"])])
    return markdown_table(columns, rows)


def worst(records: list[dict]) -> float:
    errors = [abs(_error(x["predicted_bytes"], x["measured_bytes"]) or 0.0)
              for r in records for c in r["calls"] for x in [c, *c["stages"]] if x["predicted_bytes"]]
    return max(errors, default=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--paths", default="geometric,learned")
    p.add_argument("--learned-hypotheses", type=int, default=42,
                   help="hypotheses of the learned registration (CPU time; 252 on a GPU)")
    p.add_argument("--learned-iters", type=int, default=2)
    p.add_argument("--learned-crop", type=int, default=160, help="input_resize of the learned pair")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    apply_quick(args)
    if args.quick:
        args.learned_hypotheses, args.learned_iters, args.learned_crop = 6, 1, 32
    return args


def measure(args) -> dict:
    env = environment(args.device)
    from chunkpose.shapes import builtin_meshes

    frames = synthetic_frames(args.width, args.height, 3, args.seed, mesh=builtin_meshes()["drill"])
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    progress = tqdm(total=3 * len(paths), desc="plan_accuracy", unit="case")
    records = [r for path in paths for r in run_path(path, frames, args, progress)]
    progress.close()
    return {"environment": env, "scene": frames.description, "settings": vars(args), "records": records}


def write_reports(payload: dict, out: Path, stem: str) -> list:
    env, settings, records = payload["environment"], payload["settings"], payload["records"]
    md = [f"# Predicted against measured peaks: {settings['width']}x{settings['height']}", "", *header_lines(env),
          f"- scene: {payload['scene']}",
          f"- geometric: {settings['hypotheses']} hypotheses, {settings['refine_iters']} iterations; learned (random "
          f"weights, upstream layout, {settings['learned_crop']} px crops): {settings['learned_hypotheses']} "
          f"hypotheses, {settings['learned_iters']} iterations", "",
          table(records), "",
          f"Worst error: {worst(records):.1f}%. Predicted: the planner's peak for the chunks it chose (per stage) "
          "and PoseEstimator.estimate_peak_bytes asked before the call (whole call); measured: the call's own "
          "report (CPU: live tensor bytes by chunkpose.engine.Meter; CUDA: allocator reserved bytes). Both "
          "include the renderer's framebuffers outside torch, estimated from their sizes. Unbounded runs have "
          "no per-stage prediction.", ""]
    write_markdown(out / f"{stem}.md", md)
    return []


def main(argv=None) -> int:
    measure_and_report("plan_accuracy", parse_args(argv), measure, write_reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
