"""What the command loops share: the device and mesh from the arguments, the estimator, and
one record per estimated pose (pose, score, time, peak memory, chunk plan, errors against
ground truth), the same for a video's frames and a BOP image's instances."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chunkpose.cli.parser import UserError
from chunkpose.cli.progress import StageBar


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} but CUDA is not available (use --device cpu)")
    elif name != "cpu":
        raise UserError(f"unknown --device {name!r} (use cpu, cuda or cuda:N)")
    return name


def load_mesh(path, scale):
    from chunkpose.errors import InputError
    from chunkpose.io.mesh import load_mesh as load

    try:
        return load(path, scale=scale)
    except InputError as err:
        raise UserError(f"--mesh {path}: {err}") from None


def pose_estimator(mesh, **kwargs):
    """chunkpose.PoseEstimator, imported only once the input has been checked (torch is slow
    to import and a typo in a path should be reported at once)."""
    from chunkpose import PoseEstimator

    return PoseEstimator(mesh, **kwargs)


def resolve_default_weights(args) -> None:
    """``--weights none``: the weight-free geometric pair. No ``--weights``: ./weights when it
    holds both official run folders (where upstream's demo loads them from), else the
    geometric pair. Picking up ./weights is said on stderr: the two pairs give different poses."""
    weights = getattr(args, "weights", None)
    if weights is not None:
        if str(weights).lower() == "none":
            args.weights = None
        return
    default = Path("weights")
    if not default.is_dir():
        return
    from chunkpose.estimator import holds_weights  # imports torch: only once a weights/ folder is there

    if holds_weights(default):
        args.weights = default
        print(f"chunkpose: using FoundationPose's weights in {default.resolve()} (as upstream's demo does; "
              "--weights none runs the weight-free geometric pair)", file=sys.stderr)


def make_estimator(factory, mesh, args, device, **more):
    kwargs = dict(budget_gb=args.budget_gb, device=device, refine_iterations=args.refine_iters,
                  track_iterations=args.track_iters, **more)
    if getattr(args, "weights", None) is not None:
        if not Path(args.weights).is_dir():
            raise UserError(f"--weights {args.weights} is not a folder (download the FoundationPose weights and pass their folder)")
        kwargs["weights"] = str(args.weights)
    return factory(mesh, **kwargs)


def budget_bytes(args):
    return None if args.budget_gb is None else int(args.budget_gb * 2**30)


def chunk_plan(report_dict: dict) -> dict:
    """Per stage of one call's RunReport dict: chunk sizes (run-length text), chunks, items,
    measured and predicted peaks, retries, time."""
    from chunkpose.engine.report import sizes_text

    plan = {}
    for name, st in (report_dict.get("stages") or {}).items():
        plan[str(st.get("name", name))] = {
            "chunk_sizes": sizes_text(list(st.get("chunk_sizes") or []), None),
            "chunks": st.get("n_chunks"),
            "items": st.get("items"),
            "peak_bytes": st.get("peak_bytes"),
            "predicted_peak_bytes": st.get("predicted_peak_bytes"),
            "retries": st.get("retries"),
            "wall_s": st.get("wall_s"),
        }
    return plan


def report_fields(result) -> dict:
    """Peak, downscale and chunk plan of the call that made ``result`` (each call has its
    own RunReport)."""
    report = getattr(result, "report", None)
    d = report.to_dict() if report is not None else {}
    peak = d.get("total_peak_bytes", d.get("peak_bytes"))
    downscale = d.get("downscale_factor", 1.0)
    out = {"peak_bytes": peak, "downscale_factor": float(downscale) if downscale is not None else None,
           "chunk_plan": chunk_plan(d), "engine": d}
    if d.get("downscale_reason"):
        out["downscale_reason"] = d["downscale_reason"]
    health = getattr(result, "health", None)
    if health is not None:
        out["health"] = None if health != health else float(health)  # NaN: health checks off
        out["lost"] = bool(getattr(result, "lost", False))
        out["reregistered"] = bool(getattr(result, "reregistered", False))
    return out


def error_fields(pose, gt, points, diameter=None, symmetric=False) -> dict:
    """ADD, ADD-S, rotation and translation errors of a pose against its ground truth."""
    from chunkpose.metrics import pose_errors

    if gt is None:
        return {}
    e = pose_errors(pose, gt, points)
    out = {"add": e["add"], "add_s": e["add_s"], "rot_deg": e["rot_deg"], "trans_m": e["trans_m"]}
    if diameter:
        out["diameter"] = float(diameter)
    out["add_or_adds"] = e["add_s"] if symmetric else e["add"]
    return out


def pose_record(name: str, stage: str, result, elapsed: float, input_resize: float, gt_pose, mesh,
                diameter=None, symmetric=False, **more) -> dict:
    """The report.json record of one estimated pose."""
    pose = np.asarray(result.pose, dtype=np.float64)
    score = getattr(result, "score", None)
    record = {"frame": name, "stage": stage, **more, "pose": pose,
              "score": None if score is None else float(score), "time_s": elapsed, "input_resize": input_resize,
              **report_fields(result),
              **error_fields(pose, gt_pose, model_points(mesh), diameter or mesh.diameter, symmetric)}
    if gt_pose is not None:
        record["gt_pose"] = np.asarray(gt_pose, np.float64)
    return record


def model_points(mesh) -> np.ndarray:
    return np.asarray(mesh.vertices, dtype=np.float64)


def mesh_bounds(mesh) -> np.ndarray:
    v = np.asarray(mesh.vertices, dtype=np.float64)
    return np.stack([v.min(axis=0), v.max(axis=0)])


def timed(fn, *args):
    """(fn(*args), seconds)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def register(est, frame_args, desc="register"):
    """est.register with a progress line naming the engine stage it is in (on a terminal)."""
    with StageBar(est, desc):
        return est.register(*frame_args)


def remove(paths):
    import shutil

    for path in paths:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@dataclass
class RunState:
    """The records of finished frames, and whether Ctrl-C ended the run early."""

    records: list = field(default_factory=list)
    interrupted: bool = False
    started: float = field(default_factory=time.perf_counter)


def warn(message: str) -> None:
    print(f"chunkpose: warning: {message}", file=sys.stderr)
