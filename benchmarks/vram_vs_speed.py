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
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_common_args, apply_quick, environment, header_lines, markdown_table,  # noqa: E402
                    measure_and_report, stamp_figure, write_markdown)
from _scenes import Frames, load_frames, make_estimator, resize_frames, synthetic_frames  # noqa: E402

import chunkpose  # noqa: E402
from chunkpose.metrics import add_error, adds_error  # noqa: E402
from chunkpose.ops.naive import naive_scorer_peak_bytes, naive_scorer_xyz_crops  # noqa: E402

GIB = 2**30
MIB = 2**20
CROP_SIZE = 160  # upstream's crop side
SCORER_CROP_RATIO = 1.1


def _nvml_process_bytes() -> int | None:
    """This process's GPU memory as the driver sees it (includes the CUDA context)."""
    try:
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


def below_full_resolution_minimum(frames: Frames, device: str, args, scale: float = 0.7) -> tuple[float, int]:
    """(budget GiB, full-resolution minimum GiB): a budget under what registration needs at
    full resolution with chunk size 1 (PoseEstimator.required_budget_gb, its own estimate),
    set to what it needs at ``scale``, so that the engine falls back to downscaling by about
    that factor."""
    est = make_estimator(frames.mesh, 1.0, device, args)
    inputs = (frames.rgb[0], frames.depth[0], frames.K, frames.masks[0])
    return round(est.required_budget_gb(*inputs, scale=scale), 6), est.required_budget_gb(*inputs)


def _stage_plan(report: dict) -> dict:
    """Per stage of a RunReport dict: chunk sizes, number of chunks, wall seconds (and on
    CUDA the device seconds from CUDA events)."""
    return {name: {"sizes": s["chunk_sizes"], "n_chunks": s["n_chunks"], "wall_s": s["wall_s"],
                   "gpu_s": s.get("gpu_s")}
            for name, s in report["stages"].items()}


def _alloc_retries(device: str) -> int | None:
    """The CUDA caching allocator's num_alloc_retries so far (cudaMalloc failures it recovered
    from by freeing its cache: a sign the budget margin is thin); None on the CPU."""
    if not device.startswith("cuda"):
        return None
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


class Case:
    """One budget (or scale) of the sweep: its estimator, made once, and its registration times.

    The sweep registers every case once per round (``register``), round after round and each
    round in a rotated order, so that the drifts of a noisy machine reach every case alike;
    ``finish`` then tracks the other frames and turns what was measured into the case's record.
    """

    def __init__(self, frames: Frames, budget_gb, device, args, label: str):
        self.frames, self.budget_gb, self.device, self.label = frames, budget_gb, device, label
        self.est = make_estimator(frames.mesh, budget_gb, device, args)
        self.reg_times, self.cpu_times, self.result, self.error = [], [], None, None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # so that NVML's reading after the case is this case's footprint
        self.retries_before = _alloc_retries(device)

    def register(self) -> None:
        """One timed registration on frame 0 (nothing once the budget proved too small)."""
        if self.error is not None:
            return
        frames = self.frames
        self.est.reset()
        try:
            _sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            self.result = self.est.register(frames.rgb[0], frames.depth[0], frames.K, frames.masks[0])
            _sync(self.device)
        except chunkpose.BudgetTooSmall as exc:
            self.error = exc
            return
        self.reg_times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)

    def finish(self) -> dict:
        """Track frames 1.. from the last registration; the case's record (times, peaks, chunk plan,
        pose errors)."""
        frames, device, res = self.frames, self.device, self.result
        record = {"case": self.label, "budget_gb": self.budget_gb, "width": frames.width, "height": frames.height}
        if self.error is not None or res is None:
            exc = self.error
            record.update(status="budget too small", error=str(exc), minimum_bytes=getattr(exc, "minimum_bytes", None))
            return record
        points = frames.model_points
        reports = [res.report]
        errors = [add_error(res.pose, frames.poses[0], points)] if frames.poses else []
        adds = adds_error(res.pose, frames.poses[0], points) if frames.poses else None
        track_times = []
        try:
            for i in range(1, len(frames.rgb)):
                _sync(device)
                t0 = time.perf_counter()
                tr = self.est.track(frames.rgb[i], frames.depth[i], frames.K)
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
            register_s=statistics.median(self.reg_times),
            register_runs_s=list(self.reg_times),
            register_cpu_runs_s=list(self.cpu_times),
            track_s=statistics.median(track_times) if track_times else None,
            peak_bytes=max(r.total_peak_bytes for r in reports),
            torch_peak_bytes=max(r.peak_bytes for r in reports),
            external_bytes=max(r.external_bytes for r in reports),
            peak_allocated_bytes=max(r.peak_allocated_bytes for r in reports),
            nvml_process_bytes=_nvml_process_bytes() if device.startswith("cuda") else None,
            alloc_retries=None if self.retries_before is None else _alloc_retries(device) - self.retries_before,
            downscale_factor=register_report["downscale_factor"],
            downscale_reason=register_report["downscale_reason"],
            register_peak_bytes=reports[0].total_peak_bytes,
            track_peak_bytes=max((r.total_peak_bytes for r in reports[1:]), default=None),
            chunks=_stage_plan(register_report),
            track_chunks=_stage_plan(reports[-1].to_dict()) if len(reports) > 1 else {},
            pose_register=res.pose.tolist(),
            add_register_m=errors[0] if errors else None,
            adds_register_m=adds,
            add_max_m=max(errors) if errors else None,
            diameter_m=float(frames.diameter),
        )
        within = record["budget_gb"] is None or record["peak_bytes"] <= record["budget_gb"] * GIB
        record["within_budget"] = within
        return record


def _free_bytes(device: str) -> int:
    """Memory the naive baseline may take: free device memory, or available host RAM."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _measure_naive(depth_np, K, transforms, device: str) -> tuple[int, float]:
    """(peak bytes, seconds) of the naive scorer crop preparation for these transforms: one run
    under the meter for the peak, a second one timed without it (the CPU meter slows ops)."""
    from chunkpose.engine import Meter

    depth = torch.as_tensor(depth_np, device=device)
    meter = Meter(device)
    with meter.span("naive") as span:
        meter.track(depth, scope="span")
        naive_scorer_xyz_crops(depth, K, transforms, CROP_SIZE)
    _sync(device)
    t0 = time.perf_counter()
    naive_scorer_xyz_crops(depth, K, transforms, CROP_SIZE)
    _sync(device)
    return int(span.peak_bytes), time.perf_counter() - t0


def naive_baseline(frames: Frames, device: str, hypotheses: int) -> dict:
    """Upstream's scorer crop preparation (per-hypothesis full-frame buffers, unchunked) for
    all hypotheses: measured where its predicted peak fits in free memory; where it does not,
    its peak is predicted from the shapes and the prediction is checked by measuring a few
    hypotheses (same frame), whose time per hypothesis is scaled up to all of them."""
    from chunkpose.ops.crops import crop_windows
    from chunkpose.pipeline.hypotheses import initial_poses, translation_guess

    H, W = frames.height, frames.width
    frame_bytes = H * W * 4  # the full depth map on the device
    predicted = naive_scorer_peak_bytes(hypotheses, H, W, CROP_SIZE) + frame_bytes
    free = _free_bytes(device)
    record = {"case": "naive upstream scorer crops", "budget_gb": None, "width": W, "height": H,
              "hypotheses": hypotheses, "predicted_peak_bytes": predicted, "free_bytes": free}
    t = translation_guess(frames.masks[0], frames.depth[0], frames.K)
    poses = initial_poses(t, hypotheses)
    transforms = crop_windows(poses, frames.K, frames.diameter, SCORER_CROP_RATIO, CROP_SIZE).transforms
    if predicted <= 0.8 * free:
        peak, seconds = _measure_naive(frames.depth[0], frames.K, transforms, device)
        record.update(status="measured", measured=True, crop_prep_s=seconds, peak_bytes=peak)
        return record
    per_hypothesis = naive_scorer_peak_bytes(1, H, W, CROP_SIZE)
    few = int(max(1, min(4, (0.25 * free - frame_bytes) // per_hypothesis)))
    peak, seconds = _measure_naive(frames.depth[0], frames.K, transforms[:few], device)
    record.update(
        status=f"predicted (needs {predicted / GIB:.1f} GiB, {free / GIB:.1f} GiB free)", measured=False,
        peak_bytes=predicted, crop_prep_s=seconds / few * hypotheses, check_hypotheses=few,
        check_measured_peak_bytes=peak,
        check_predicted_peak_bytes=naive_scorer_peak_bytes(few, H, W, CROP_SIZE) + frame_bytes,
        check_seconds=seconds,
    )
    return record


def plot(records: list[dict], path: Path, title: str, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    sweep = sorted((r for r in records if r["case"].startswith("budget") and r.get("status") == "ok"),
                   key=lambda r: r["peak_bytes"])
    if sweep:
        # Budgets at or above the unbounded peak share one plan and one peak: one point for
        # them (median time, bar from fastest to slowest) rather than labels on top of each other.
        groups: list[list[dict]] = []
        for r in sweep:
            if groups and abs(r["peak_bytes"] - groups[-1][0]["peak_bytes"]) <= 0.005 * r["peak_bytes"]:
                groups[-1].append(r)
            else:
                groups.append([r])
        xs = [g[0]["peak_bytes"] / MIB for g in groups]
        ys = [statistics.median(r["register_s"] for r in g) for g in groups]
        spread = [[y - min(r["register_s"] for r in g) for y, g in zip(ys, groups)],
                  [max(r["register_s"] for r in g) - y for y, g in zip(ys, groups)]]
        ax.errorbar(xs, ys, yerr=spread, fmt="o-", capsize=3, label="chunkpose, budget sweep (bar: budgets with one plan, fastest to slowest)")
        for x, y, g in zip(xs, ys, groups):
            tags = ["unbounded" if r["budget_gb"] is None else f"{r['budget_gb']:.4g}" for r in g]
            tag = tags[0] if len(tags) == 1 else f"{tags[0]}, {tags[1]} .. {tags[-1]}"
            tag += "" if tags[-1] == "unbounded" else " GiB"
            factor = g[0].get("downscale_factor", 1.0)
            if factor != 1.0:
                tag += f" (x{factor:.2f})"
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    downscaled = [r for r in records if r["case"].startswith("downscale") and r.get("status") == "ok"]
    for i, r in enumerate(downscaled):
        ax.plot(r["peak_bytes"] / MIB, r["register_s"], "s", color="tab:orange")
        ax.annotate(r["case"], (r["peak_bytes"] / MIB, r["register_s"]), textcoords="offset points",
                    xytext=(4, -10 - 10 * i), fontsize=8)
    for r in records:
        if r["case"].startswith("naive"):
            how = "measured" if r.get("measured") else "predicted from shapes"
            ax.axvline(r["peak_bytes"] / MIB, color="tab:red", ls="--",
                       label=f"naive upstream scorer crops: {r['peak_bytes'] / GIB:.3g} GiB ({how})")
    peaks = [r["peak_bytes"] for r in records if r.get("peak_bytes")]
    if peaks and max(peaks) > 10 * min(peaks):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("measured peak memory (MiB, log scale)")
    else:
        ax.set_xlabel("measured peak memory (MiB)")
    ax.set_ylabel("registration wall time (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    stamp_figure(fig, env)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mib(value):
    return None if value is None else round(value / 2**20, 1)


def _mm(metres):
    return None if metres is None else round(metres * 1000, 2)


def _plan_text(chunks: dict) -> str:
    """Per stage: distinct chunk sizes and the number of chunks, e.g. refine.geometric:16/4 (80)."""
    return ", ".join(f"{name}:{'/'.join(map(str, sorted(set(s['sizes']), reverse=True)))} ({s['n_chunks']})"
                     for name, s in chunks.items())


def time_ratio(record: dict, base: dict | None, runs_key: str = "register_runs_s") -> float | None:
    """Registration time over the unbounded case's: the median of the per-round ratios when both
    have their rounds (the cases of a round ran back to back, so a round's ratio is free of the
    machine's slow drifts), else the ratio of the medians. ``runs_key`` "register_cpu_runs_s":
    the same with the process's CPU seconds (all its threads; what the work costs, without the
    time a shared machine gives to others), None where they were not recorded."""
    seconds = record.get("register_s", record.get("crop_prep_s"))
    if base is None or seconds is None:
        return None
    runs, base_runs = record.get(runs_key) or [], base.get(runs_key) or []
    if runs and len(runs) == len(base_runs):
        return round(statistics.median(a / b for a, b in zip(runs, base_runs)), 2)
    if runs_key != "register_runs_s":
        return None
    return round(seconds / base["register_s"], 2)


def table(records: list[dict], cuda: bool) -> str:
    columns = ["case", "budget GiB", "status", "peak MiB", "outside torch MiB", "track peak MiB", "register s",
               "x unbounded", "x unbounded, CPU s", "track s/frame", "downscale", "ADD reg (mm)", "ADD-S reg (mm)", "ADD max (mm)",
               "chunk sizes (number of chunks), register"]
    if cuda:
        columns[5:5] = ["alloc MiB", "NVML MiB"]
    base = next((r for r in records if r["case"] == "budget unbounded" and r.get("status") == "ok"), None)
    rows = []
    for r in records:
        seconds = r.get("register_s", r.get("crop_prep_s"))
        row = [
            r["case"], "unbounded" if r.get("budget_gb") is None else r["budget_gb"], r.get("status"),
            _mib(r.get("peak_bytes")), _mib(r.get("external_bytes")), _mib(r.get("track_peak_bytes")), seconds,
            time_ratio(r, base), None if cuda else time_ratio(r, base, "register_cpu_runs_s"), r.get("track_s"),
            r.get("downscale_factor"),
            _mm(r.get("add_register_m")), _mm(r.get("adds_register_m")), _mm(r.get("add_max_m")),
            _plan_text(r.get("chunks") or {}),
        ]
        if cuda:
            row[5:5] = [_mib(r.get("peak_allocated_bytes")), _mib(r.get("nvml_process_bytes"))]
        rows.append(row)
    return markdown_table(columns, rows)


def naive_note(record: dict) -> str:
    if record.get("measured"):
        return (f"Naive row: upstream's scorer crop preparation alone (per-hypothesis full-frame buffers, "
                f"{record['hypotheses']} hypotheses, unchunked), measured in this run.")
    return (f"Naive row: upstream's scorer crop preparation alone ({record['hypotheses']} hypotheses, "
            f"per-hypothesis full-frame buffers, unchunked). It does not fit here ({record['status']}): the peak "
            f"is PREDICTED from the tensor shapes; the prediction was checked by measuring "
            f"{record['check_hypotheses']} hypotheses on the same frame (measured "
            f"{_mib(record['check_measured_peak_bytes'])} MiB, predicted {_mib(record['check_predicted_peak_bytes'])} MiB), "
            f"and its time is that measurement scaled to {record['hypotheses']} hypotheses.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--frames", type=int, default=4, help="1 registration + frames-1 tracking frames")
    p.add_argument("--repeats", type=int, default=1, help="registration repeats (median)")
    p.add_argument("--budgets", type=str, default="none,16,8,4,2,1,0.5",
                   help="comma-separated GiB ('none' = unbounded); one below the minimum is added")
    p.add_argument("--track-iters", type=int, default=2)
    p.add_argument("--scene", help="a YCBInEOAT scene folder instead of the synthetic one")
    p.add_argument("--mesh", help="the mesh file for --scene; without --scene a builtin mesh name (default drill, "
                                  "as the demo: not symmetric, so ADD is meaningful)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", choices=("geometric", "learned"), default="geometric",
                   help="refiner/scorer pair: weight-free geometric, or learned (random upstream-layout weights)")
    p.add_argument("--learned-crop", type=int, default=160, help="learned pair's input_resize")
    args = p.parse_args(argv)
    apply_quick(args)
    if args.quick:
        args.frames, args.track_iters, args.budgets = 2, 1, "none,0.06"
        args.learned_crop = 32
    if args.scene and not args.mesh:
        p.error("--scene needs --mesh (the object's mesh file)")
    return args


def measure(args) -> dict:
    """Run every case; the raw payload that the reports are drawn from."""
    env = environment(args.device)
    if args.scene:
        frames = load_frames(args.scene, args.mesh, args.frames)
    else:
        from chunkpose.shapes import builtin_meshes

        meshes = builtin_meshes()
        name = args.mesh or "drill"
        if name not in meshes:
            raise SystemExit(f"--mesh: {name!r} is not a builtin mesh ({', '.join(sorted(meshes))}); "
                             "pass --scene DIR with a mesh file for your own object")
        frames = synthetic_frames(args.width, args.height, args.frames, args.seed, mesh=meshes[name])
        frames.description += f", mesh {name}"
    budgets = [None if b.strip().lower() == "none" else float(b) for b in args.budgets.split(",")]
    cases = [Case(frames, b, args.device, args, f"budget {b if b is not None else 'unbounded'}") for b in budgets]
    # A quarter of what the unbounded run peaks at (how much a tight budget costs in time) and a
    # budget below what full resolution needs even at chunk size 1 (the fallback): the unbounded
    # case runs once first to know its peak (a warm-up, not timed).
    unbounded = next((c for c in cases if c.budget_gb is None), None)
    if unbounded is not None:
        unbounded.register()
        unbounded.reg_times.clear()
        unbounded.cpu_times.clear()
        quarter = round(unbounded.result.report.total_peak_bytes / 4 / GIB, 4)
        cases.append(Case(frames, quarter, args.device, args, f"budget {quarter:.4g} (1/4 of the unbounded peak)"))
    below, minimum = below_full_resolution_minimum(frames, args.device, args)
    cases.append(Case(frames, below, args.device, args, f"budget {below:.4g} (below full-res minimum)"))
    for factor in (0.5, 0.3):
        cases.append(Case(resize_frames(frames, factor), None, args.device, args, f"downscale {factor} (no budget)"))
    progress = tqdm(total=len(cases) * args.repeats + 1, desc="vram_vs_speed", unit="run")
    for round_ in range(args.repeats):
        # Interleaved (every case once per round) and rotated (each round starts further along)
        # so that no case always runs first, right after the previous round's smallest frames.
        start = round_ * len(cases) // args.repeats
        for case in cases[start:] + cases[:start]:
            progress.set_postfix_str(f"round {round_ + 1}: {case.label}")
            case.register()
            progress.update()
    records = []
    for case in cases:
        records.append(case.finish())
        if "below full-res minimum" in case.label:
            records[-1]["full_resolution_minimum_gb"] = minimum
    progress.set_postfix_str("naive")
    records.append(naive_baseline(frames, args.device, args.hypotheses))
    progress.update()
    progress.close()
    return {"environment": env, "scene": frames.description, "settings": vars(args), "records": records}


def write_reports(payload: dict, out: Path, stem: str) -> list[dict]:
    """The markdown table and the plot of ``payload``; returns the cases over their budget."""
    env, settings, records = payload["environment"], payload["settings"], payload["records"]
    width, height = records[0]["width"], records[0]["height"]
    title = (f"{width}x{height}, {settings['hypotheses']} hypotheses, {settings['refine_iters']} iterations, "
             f"{settings.get('path', 'geometric')} pair on {env.get('gpu', env['cpu'])}")
    plot(records, out / f"{stem}.png", title, env)
    md = [f"# VRAM versus speed: {title}", "", *header_lines(env), f"- scene: {payload['scene']}", "",
          table(records, env["device"].startswith("cuda")), "",
          "Peak: CUDA allocator reserved bytes (alloc = allocated, NVML = the process as the driver sees it, "
          "context included, read after the case); CPU live tensor bytes (chunkpose.engine.Meter); both plus "
          "what the renderer holds outside torch (its framebuffers, estimated from their sizes; own column). Peak and "
          "chunks cover registration and tracking; times are wall-clock of this run (registration: median of "
          f"{settings['repeats']} rounds, every case registered once per round, each round in a rotated order, "
          "so that the machine's drifts reach all cases alike; x unbounded: the median of the rounds' ratios; on the CPU also of the process's CPU "
          "seconds, which a shared machine's other tenants do not inflate; tracking: median over "
          f"{max(0, settings['frames'] - 1)} frames); compare ratios "
          "within one table only. ADD / ADD-S against the synthetic ground truth (ADD max: over all frames); "
          f"object diameter {records[0].get('diameter_m', 0) * 1000:.0f} mm.", "", naive_note(records[-1]), "",
          f"![plot]({stem}.png)", ""]
    write_markdown(out / f"{stem}.md", md)
    return [r for r in records if r.get("within_budget") is False]


def main(argv=None) -> int:
    args = parse_args(argv)
    name = "vram_vs_speed" if args.path == "geometric" else f"vram_vs_speed_{args.path}"
    failures = measure_and_report(name, args, measure, write_reports)
    if failures:
        print(f"BUDGET EXCEEDED in {len(failures)} case(s): " + ", ".join(r["case"] for r in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
