"""VRAM versus speed at full resolution: one scene, a sweep of budgets, and two baselines.

    python benchmarks/vram_vs_speed.py                 # 3072x2048, full sweep (slow on CPU)
    python benchmarks/vram_vs_speed.py --quick         # small smoke run, seconds
    python benchmarks/vram_vs_speed.py --scene DIR --mesh FILE   # a user's YCBInEOAT scene

For every budget: measured peak (CUDA: allocator reserved and allocated, plus NVML process
memory; CPU: live tensor bytes), registration time, median time per tracking frame,
per-stage chunk sizes, the downscale factor and the pose error against ground truth.
Baselines in the same run: the naive upstream memory pattern of the scorer's crop
preparation (measured where it fits, predicted from shapes where it does not), and
downscaled inputs (0.5, 0.3) without a budget. Writes a markdown table, a PNG plot and
the raw JSON under benchmarks/results/<machine>/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, header_lines, markdown_table, output_dir, write_json  # noqa: E402
from scenes import Frames, load_frames, resize_frames, synthetic_frames  # noqa: E402

import chunkpose  # noqa: E402
from chunkpose.metrics import add_error  # noqa: E402
from chunkpose.ops.naive import naive_scorer_peak_bytes, naive_scorer_xyz_crops  # noqa: E402

GIB = 2**30


def _nvml_process_bytes() -> int | None:
    """This process's GPU memory as the driver sees it (includes the CUDA context)."""
    try:
        import os

        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory)
    except Exception:
        return None
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(frames: Frames, budget_gb, device, args, label: str) -> dict:
    """Register on frame 0, track the rest; time, peaks, chunk plan and pose errors."""
    est = chunkpose.PoseEstimator(frames.mesh, budget_gb=budget_gb, device=device,
                                  refine_iterations=args.refine_iters, track_iterations=args.track_iters,
                                  hypotheses=args.hypotheses)
    points = frames.model_points
    record = {"case": label, "budget_gb": budget_gb, "width": frames.width, "height": frames.height}
    try:
        reg_times = []
        for _ in range(args.repeats):
            est.reset()
            _sync(device)
            t0 = time.perf_counter()
            res = est.register(frames.rgb[0], frames.depth[0], frames.K, frames.masks[0])
            _sync(device)
            reg_times.append(time.perf_counter() - t0)
        reports = [res.report]
        errors = [add_error(res.pose, frames.poses[0], points)] if frames.poses else []
        track_times = []
        for i in range(1, len(frames.rgb)):
            _sync(device)
            t0 = time.perf_counter()
            tr = est.track(frames.rgb[i], frames.depth[i], frames.K)
            _sync(device)
            track_times.append(time.perf_counter() - t0)
            reports.append(tr.report)
            if frames.poses:
                errors.append(add_error(tr.pose, frames.poses[i], points))
    except chunkpose.BudgetTooSmall as exc:
        record.update(status="budget too small", error=str(exc), minimum_bytes=getattr(exc, "minimum_bytes", None))
        return record
    register_report = reports[0].to_dict()
    record.update(
        status="ok",
        register_s=statistics.median(reg_times),
        track_s=statistics.median(track_times) if track_times else None,
        peak_bytes=max(r.peak_bytes for r in reports),
        peak_allocated_bytes=max(r.peak_allocated_bytes for r in reports),
        nvml_process_bytes=_nvml_process_bytes() if device.startswith("cuda") else None,
        downscale_factor=register_report["downscale_factor"],
        downscale_reason=register_report["downscale_reason"],
        chunks={name: {"sizes": s["chunk_sizes"], "n_chunks": s["n_chunks"]}
                for name, s in register_report["stages"].items()},
        add_register_m=errors[0] if errors else None,
        add_max_m=max(errors) if errors else None,
        diameter_m=float(frames.diameter),
    )
    within = record["budget_gb"] is None or record["peak_bytes"] <= record["budget_gb"] * GIB
    record["within_budget"] = within
    return record


def naive_baseline(frames: Frames, device: str, hypotheses: int) -> dict:
    """The upstream scorer's crop preparation: per-hypothesis full-frame buffers, unchunked.
    Measured where its predicted peak fits in memory, predicted from shapes otherwise."""
    from chunkpose.engine import Meter
    from chunkpose.ops.crops import crop_windows
    from chunkpose.pipeline.hypotheses import initial_poses, translation_guess

    H, W = frames.height, frames.width
    predicted = naive_scorer_peak_bytes(hypotheses, H, W)
    record = {"case": "naive upstream scorer crops", "budget_gb": None, "width": W, "height": H,
              "hypotheses": hypotheses, "predicted_peak_bytes": predicted}
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if predicted > 0.8 * free:
        record.update(status="predicted (does not fit)", peak_bytes=predicted, measured=False)
        return record
    K = torch.as_tensor(frames.K, dtype=torch.float32, device=device)
    t = translation_guess(frames.depth[0], frames.masks[0], frames.K)
    poses = initial_poses(t, hypotheses).to(device)
    windows = crop_windows(poses, K, frames.diameter, 1.1, 160)
    depth = torch.as_tensor(frames.depth[0], device=device)
    meter = Meter(device)
    _sync(device)
    t0 = time.perf_counter()
    with meter.span() as span:
        meter.track(depth)
        naive_scorer_xyz_crops(depth, K, windows.transforms, 160)
    _sync(device)
    record.update(status="measured", measured=True, crop_prep_s=time.perf_counter() - t0,
                  peak_bytes=span.peak_bytes)
    return record


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    sweep = [r for r in records if r["case"].startswith("budget") and r.get("status") == "ok"]
    if sweep:
        ax.plot([r["peak_bytes"] / GIB for r in sweep], [r["register_s"] for r in sweep], "o-", label="chunkpose, budget sweep")
        for r in sweep:
            tag = "unbounded" if r["budget_gb"] is None else f"{r['budget_gb']:g} GiB"
            if r.get("downscale_factor", 1.0) != 1.0:
                tag += f" (x{r['downscale_factor']:.2f})"
            ax.annotate(tag, (r["peak_bytes"] / GIB, r["register_s"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for r in records:
        if r["case"].startswith("downscale") and r.get("status") == "ok":
            ax.plot(r["peak_bytes"] / GIB, r["register_s"], "s", color="tab:orange")
            ax.annotate(r["case"], (r["peak_bytes"] / GIB, r["register_s"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        if r["case"].startswith("naive"):
            ax.axvline(r["peak_bytes"] / GIB, color="tab:red", ls="--",
                       label=f"naive upstream scorer crops ({'measured' if r.get('measured') else 'predicted'})")
    ax.set_xscale("log")
    ax.set_xlabel("measured peak device memory (GiB, log)")
    ax.set_ylabel("registration wall time (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(records: list[dict]) -> str:
    columns = ["case", "budget GiB", "status", "peak MiB", "alloc MiB", "register s", "track s/frame",
               "downscale", "ADD reg (mm)", "ADD max (mm)", "chunks (register)"]
    rows = []
    for r in records:
        chunks = r.get("chunks") or {}
        plan = ", ".join(f"{name}:{'/'.join(map(str, sorted(set(s['sizes']))))}" for name, s in chunks.items())
        rows.append([
            r["case"], "unbounded" if r.get("budget_gb") is None else r["budget_gb"], r.get("status"),
            None if r.get("peak_bytes") is None else round(r["peak_bytes"] / 2**20, 1),
            None if r.get("peak_allocated_bytes") is None else round(r["peak_allocated_bytes"] / 2**20, 1),
            r.get("register_s", r.get("crop_prep_s")), r.get("track_s"), r.get("downscale_factor"),
            None if r.get("add_register_m") is None else round(r["add_register_m"] * 1000, 2),
            None if r.get("add_max_m") is None else round(r["add_max_m"] * 1000, 2), plan,
        ])
    return markdown_table(columns, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (320x240, few hypotheses)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--frames", type=int, default=4, help="1 registration + frames-1 tracking frames")
    p.add_argument("--repeats", type=int, default=1, help="registration repeats (median)")
    p.add_argument("--budgets", type=str, default="none,16,8,4,2,1,0.5",
                   help="comma-separated GiB ('none' = unbounded); one below the minimum is added")
    p.add_argument("--hypotheses", type=int, default=252)
    p.add_argument("--refine-iters", type=int, default=5)
    p.add_argument("--track-iters", type=int, default=2)
    p.add_argument("--scene", help="a YCBInEOAT scene folder instead of the synthetic one")
    p.add_argument("--mesh", help="the mesh for --scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default benchmarks/results/<machine>/)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.height, args.frames, args.hypotheses, args.refine_iters = 320, 240, 2, 42, 2
        args.budgets = "none,0.05"
    if bool(args.scene) != bool(args.mesh):
        p.error("--scene and --mesh go together")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(args.device)
    if args.scene:
        frames = load_frames(args.scene, args.mesh, args.frames)
    else:
        frames = synthetic_frames(args.width, args.height, args.frames, args.seed)
    budgets = [None if b.strip().lower() == "none" else float(b) for b in args.budgets.split(",")]
    records = []
    progress = tqdm(total=len(budgets) + 4, desc="vram_vs_speed", unit="case")
    for budget in budgets:
        progress.set_postfix_str(f"budget {budget}")
        records.append(run_case(frames, budget, args.device, args, f"budget {budget if budget is not None else 'unbounded'}"))
        progress.update()
    # One budget below what full resolution needs, to show the fallback: a quarter of the
    # smallest full-resolution peak seen in the sweep.
    full_res = [r["peak_bytes"] for r in records if r.get("status") == "ok" and r.get("downscale_factor") == 1.0]
    if full_res:
        below = round(min(full_res) / 4 / GIB, 4)
        progress.set_postfix_str(f"budget {below} (below minimum)")
        records.append(run_case(frames, below, args.device, args, f"budget {below} (below full-res peak)"))
    progress.update()
    for factor in (0.5, 0.3):
        progress.set_postfix_str(f"downscale {factor}")
        small = resize_frames(frames, factor)
        record = run_case(small, None, args.device, args, f"downscale {factor} (no budget)")
        records.append(record)
        progress.update()
    progress.set_postfix_str("naive")
    records.append(naive_baseline(frames, args.device, args.hypotheses))
    progress.update()
    progress.close()

    out = output_dir(env, args.out)
    stem = "vram_vs_speed_quick" if args.quick else "vram_vs_speed"
    title = f"{frames.width}x{frames.height}, {args.hypotheses} hypotheses, {args.refine_iters} iterations on {env.get('gpu', env['cpu'])}"
    payload = {"environment": env, "scene": frames.description, "settings": vars(args), "records": records}
    write_json(out / f"{stem}.json", payload)
    plot(records, out / f"{stem}.png", title)
    md = [f"# VRAM versus speed: {title}", "", *header_lines(env), f"- scene: {frames.description}", "",
          table(records), "",
          "Peak: CUDA allocator reserved bytes (alloc = allocated); CPU live tensor bytes. "
          "Times are wall-clock of this run; compare ratios within one table only.",
          f"![plot]({stem}.png)", ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    failures = [r for r in records if r.get("within_budget") is False]
    if failures:
        print(f"BUDGET EXCEEDED in {len(failures)} case(s): " + ", ".join(r["case"] for r in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
