"""Full-resolution geometry ops: compiled extension vs pure-torch path vs a naive version.

Two jobs at 3072x2048 (the motivating resolution):
  1. depth -> xyz point map: the extension writes in place into a preallocated (H,W,3) map;
     the torch path does the same with torch ops; "naive" builds pixel grids and a points
     tensor the way a straightforward (upstream-style) implementation does.
  2. crop preparation for B hypotheses (scorer semantics): rgb crops (bilinear) and observed
     xyz crops, with only the ROI copied to the device and cleaned (chunkpose.pipeline.frame.prepare_frame),
     vs upstream's data flow (full frame on the device, per-hypothesis full-resolution depth /
     xyz buffers), which cannot run at B=252 (about 37 GiB): it is timed at a small B and
     reported per hypothesis, and its B=252 peak is computed from the tensor shapes.

Peaks: CPU = live torch tensor bytes (the engine's meter); CUDA = max_memory_allocated.

    python benchmarks/ops_bench.py [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import chunkpose.ops as ops  # noqa: E402
from chunkpose.ops import _ext  # noqa: E402
from chunkpose.ops.naive import naive_scorer_peak_bytes, naive_scorer_xyz_crops  # noqa: E402
from chunkpose.pipeline.frame import prepare_frame  # noqa: E402
from chunkpose.pipeline.roi import CLEANUP, CallRegion  # noqa: E402


# ----------------------------------------------------------------------------- measuring
class Peak:
    """Peak live tensor bytes of a block (CPU meter, or the CUDA allocator)."""

    def __init__(self, device: str):
        self.device = device
        self.bytes = 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from chunkpose.engine.meter import Meter

            self._meter = Meter("cpu")
            self._cm = self._meter.span("bench")
            self._span = self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._cm.__exit__(*exc)
            self.bytes = self._span.peak_bytes
        return False


def timed(fn, device: str, repeats: int):
    """(median seconds over ``repeats`` timed runs, peak bytes, last result). A first, untimed
    run measures the peak (the meter's dispatch mode would slow the timed runs) and warms up."""
    with Peak(device) as p:
        out = fn()
    peak = p.bytes
    times = []
    for _ in range(repeats):
        out = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak, out


def with_path(path: str, fn):
    if path == "torch":
        def run():
            with ops.torch_path():
                return fn()
        return run
    return fn


# ----------------------------------------------------------------------------- scene
def make_frame(H, W, seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
    depth = (0.6 + 0.2 * rng.random((H, W), dtype=np.float32)).astype(np.float32)
    depth[rng.random((H, W)) < 0.05] = 0.0
    f = 2400.0 * W / 3072
    K = np.array([[f, 0, W / 2 - 0.7], [0, f, H / 2 - 0.3], [0, 0, 1]])
    return rgb, depth, K


def hypotheses(B, K, footprint_px, seed=0):
    """B rotations around one translation (registration: all share the translation guess)."""
    from scipy.spatial.transform import Rotation

    poses = np.tile(np.eye(4), (B, 1, 1))
    poses[:, :3, :3] = Rotation.random(B, random_state=seed).as_matrix()
    poses[:, 2, 3] = 0.2 * 1.1 * K[0, 0] / footprint_px
    return poses


# ----------------------------------------------------------------------------- naive versions
def naive_depth_to_xyz(depth, K):
    """Pixel grids + K^-1 rays + a points tensor, then a mask: what a direct port allocates."""
    H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, device=depth.device), torch.arange(W, device=depth.device), indexing="ij")
    ones = torch.ones_like(u)
    pix = torch.stack([u, v, ones], -1).reshape(-1, 3).float()
    Kinv = torch.linalg.inv(torch.as_tensor(K, dtype=torch.float32, device=depth.device))
    pts = (pix @ Kinv.T) * depth.reshape(-1, 1)
    pts[depth.reshape(-1) < 0.001] = 0
    return pts.reshape(H, W, 3)


def naive_erode_unfold(depth, radius=2, diff=0.001, ratio=0.8, zfar=100.0):
    """Whole-frame unfold: (2r+1)^2 copies of the frame at once, the direct vectorisation."""
    H, W = depth.shape
    k = 2 * radius + 1
    inside = F.unfold(torch.ones(1, 1, H, W, device=depth.device), k, padding=radius)[0]
    win = F.unfold(depth[None, None], k, padding=radius)[0]  # (k*k, H*W)
    c = depth.reshape(1, -1)
    bad = ((win < 0.001) | (win >= zfar) | ((win - c).abs() > diff)) & (inside > 0)
    frac = bad.sum(0).float() / inside.sum(0)
    keep = (frac <= ratio) & (c[0] >= 0.001) & (c[0] < zfar)
    return torch.where(keep, c[0], torch.zeros((), device=depth.device)).reshape(H, W)


def roi_crop_preparation(rgb, depth, K, windows, device):
    """chunkpose's scorer data flow: the windows' ROI (plus the clean-up's halo) uploaded and
    cleaned (prepare_frame), then rgb and xyz crops read from it."""
    region = CallRegion.of_box(windows.roi, depth.shape, has_mask=False)
    frame = prepare_frame(rgb, depth, K, None, region, 0.2, None, device)
    transforms = windows.transforms.to(device)
    return frame.rgb_crops(transforms, windows.size), frame.xyz_crops(transforms, windows.size, "scorer")


def naive_crop_preparation(rgb, depth, K, T, size):
    """Upstream's scorer data flow: the full frame on the device, rgb crops from it, xyz crops
    through per-hypothesis full-resolution depth and point maps (chunkpose.ops.naive)."""
    dev = T.device
    rgb_full = torch.from_numpy(rgb).to(dev).permute(2, 0, 1).float()
    depth_full = torch.from_numpy(depth).to(dev)
    rgb_crops = ops.warp_crops(rgb_full, T, size, "bilinear")
    return rgb_crops, naive_scorer_xyz_crops(depth_full, K, T, size)


def naive_crop_preparation_bytes(B, H, W, size):
    """Predicted peak of naive_crop_preparation: the naive xyz crops plus the rgb crops."""
    return naive_scorer_peak_bytes(B, H, W, size) + B * 3 * size * size * 4


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch and one repeat (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<machine>)")
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--height", type=int, default=2048)
    args = ap.parse_args(argv)
    dev = args.device
    H, W = args.height, args.width
    B = 32 if args.quick else 252
    B_naive = 1 if args.quick else 2
    repeats = 1 if args.quick else 5
    size = 160
    env = common.environment(dev)
    env["ops_backend"] = ops.backend(dev)
    env["ext_error"] = _ext.load_error()
    paths = ["ext", "torch"] if _ext.use_ext(dev) else ["torch"]
    rows, results = [], {"env": env, "height": H, "width": W, "hypotheses": B, "depth_to_xyz": {}, "crops": {}}

    rgb, depth_np, K = make_frame(H, W)
    depth = torch.from_numpy(depth_np).to(dev)

    # 1. depth -> xyz
    xyz_ref = None
    for path in paths:
        out = torch.empty(H, W, 3, device=dev)
        sec, peak, res = timed(with_path(path, lambda: ops.depth_to_xyz(depth, K, out=out)), dev, repeats)
        xyz_ref = res.clone() if xyz_ref is None else xyz_ref
        results["depth_to_xyz"][path] = {"seconds": sec, "peak_bytes": peak, "equal_to_first": bool(torch.equal(res, xyz_ref))}
    sec, peak, res = timed(lambda: naive_depth_to_xyz(depth, K), dev, repeats)
    results["depth_to_xyz"]["naive"] = {"seconds": sec, "peak_bytes": peak,
                                        "max_abs_diff": float((res - xyz_ref).abs().max())}
    del res, xyz_ref
    base = results["depth_to_xyz"]["naive"]["seconds"]
    for name, r in results["depth_to_xyz"].items():
        rows.append(["depth->xyz", name, f"{H}x{W}", r["seconds"] * 1e3, base / r["seconds"], r["peak_bytes"] / 2**20, "in place (H,W,3)" if name != "naive" else "allocates grids + points"])

    # 1b. depth clean-up on the full frame (whole frame at once; the engine can band it)
    for job, fn in [("erode", ops.erode_depth), ("bilateral", ops.bilateral_filter_depth)]:
        results[job] = {}
        first = None
        for path in paths:
            sec, peak, res = timed(with_path(path, lambda: fn(depth)), dev, repeats)
            first = res if first is None else first
            results[job][path] = {"seconds": sec, "peak_bytes": peak,
                                  "max_abs_diff_to_first": float((res - first).abs().max())}
        if job == "erode":
            sec, peak, res = timed(lambda: naive_erode_unfold(depth), dev, max(1, repeats // 2))
            results[job]["naive"] = {"seconds": sec, "peak_bytes": peak, "equal": bool(torch.equal(res, first))}
        del first, res
        base = results[job].get("naive", results[job]["torch"])["seconds"]
        for name, r in results[job].items():
            note = "whole-frame unfold (25 copies)" if name == "naive" else "row bands with halo (here: one band)"
            rows.append([job, name, f"{H}x{W}", r["seconds"] * 1e3, base / r["seconds"], r["peak_bytes"] / 2**20, note])

    # 2. crop preparation (scorer semantics), only the ROI on the device
    poses = hypotheses(B, K, footprint_px=600)
    cw = ops.crop_windows(poses, K, 0.2, 1.1, size, image_size=(H, W))
    cw.transforms = cw.transforms.to(dev)
    roi = cw.roi
    ref = None
    for path in paths:
        sec, peak, res = timed(with_path(path, lambda: roi_crop_preparation(rgb, depth_np, K, cw, dev)),
                               dev, repeats)
        ref = res if ref is None else ref
        results["crops"][path] = {"seconds": sec, "seconds_per_hypothesis": sec / B, "peak_bytes": peak,
                                  "xyz_equal_to_first": bool(torch.equal(res[1], ref[1])),
                                  "rgb_max_abs_diff": float((res[0] - ref[0]).abs().max())}
    Tn = cw.transforms[:B_naive]
    # upstream cleans the whole frame first (not timed here): its crops read the cleaned depth
    cleaned_np = CLEANUP.dense(torch.from_numpy(depth_np)).numpy()
    sec, peak, res = timed(lambda: naive_crop_preparation(rgb, cleaned_np, K, Tn, size), dev, repeats)
    xyz_equal = bool(torch.equal(res[1], ref[1][:B_naive]))
    results["crops"]["naive"] = {"seconds": sec, "seconds_per_hypothesis": sec / B_naive, "measured_hypotheses": B_naive,
                                 "peak_bytes": peak, "peak_bytes_per_hypothesis": peak / B_naive,
                                 "computed_peak_bytes_at_B": naive_crop_preparation_bytes(B, H, W, size),
                                 "xyz_equal_to_first": xyz_equal}
    results["crops"]["roi"] = list(roi)
    base = results["crops"]["naive"]["seconds_per_hypothesis"]
    for name in paths + ["naive"]:
        r = results["crops"][name]
        note = f"ROI {roi[2] - roi[0]}x{roi[3] - roi[1]} copied and cleaned" if name != "naive" else \
            f"measured at B={B_naive}; B={B} needs {r['computed_peak_bytes_at_B'] / 2**30:.1f} GiB (shapes)"
        rows.append([f"crop prep B={B}", name, f"{H}x{W}", r["seconds_per_hypothesis"] * 1e3,
                     base / r["seconds_per_hypothesis"], r["peak_bytes"] / 2**20, note])

    columns = ["job", "path", "frame", "ms (crops: per hypothesis)", "speed-up vs naive (bilateral: vs torch)", "peak MiB", "note"]
    out_dir = common.output_dir(env, args.out)
    md = ["# ops_bench: extension vs torch path vs naive", "", *common.header_lines(env),
          f"- backend: `{env['ops_backend']}`, hypotheses B={B}, crop {size}x{size}, repeats {repeats} (median)", "",
          common.markdown_table(columns, rows), "",
          "Peaks: live tensor bytes (CPU meter) or max_memory_allocated (CUDA). The naive crop preparation is "
          "upstream's scorer data flow (per-hypothesis full-resolution depth and xyz buffers); its B=252 peak "
          "is computed from tensor shapes, never allocated."]
    name = "ops_bench_quick" if args.quick else "ops_bench"
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    common.write_json(out_dir / f"{name}.json", results)
    print("\n".join(md))
    print(f"\nwritten to {out_dir}")


if __name__ == "__main__":
    main()
