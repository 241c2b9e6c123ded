"""The ``chunkpose`` command: run on a YCBInEOAT or BOP scene, a synthetic demo, benchmarks.

    chunkpose run --scene DIR --mesh FILE [--budget-gb G] [--device cpu|cuda] ...
    chunkpose run --bop DATASET_DIR --split test --scene-id N [--mesh FILE] ...
    chunkpose demo [--width 3072 --height 2048] [--budget-gb 1] [--frames 5] ...
    chunkpose bench ...            (forwards to benchmarks/ in a source checkout)

FoundationPose's demo flags are accepted as aliases: --test_scene_dir, --mesh_file,
--est_refine_iter, --track_refine_iter, --debug_dir (and --debug 0..3 means the same).

Bad input ends with one line on stderr, ``chunkpose: error: <what> (<how to fix>)``, exit
code 2 and no output folder. Ctrl-C keeps the finished frames, writes a valid report and
exits with 130. With --json the last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The demo's object unless --mesh is given: a builtin without rotational symmetry (the mug
#: looks the same turned upside down when its label is not used, so its ADD is ambiguous).
DEMO_MESH = "drill"
DEMO_BUILTINS = ("blocks", "drill", "duck", "mug")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Something the user can fix; printed as one line, exit code 2."""


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _non_negative_int(text):
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def _add_estimator_options(p, default_budget):
    g = p.add_argument_group("estimator")
    g.add_argument("--budget-gb", type=_positive_float, metavar="G", default=default_budget,
                   help=f"device memory budget in GiB (default {default_budget:g})")
    g.add_argument("--device", default="auto", metavar="cpu|cuda", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--weights", type=Path, metavar="DIR", default=None,
                   help="folder with the official FoundationPose weights (default: weight-free geometric refiner)")
    g.add_argument("--refine-iters", "--est_refine_iter", type=_positive_int, metavar="N", default=5, help="refinement iterations at registration (5)")
    g.add_argument("--track-iters", "--track_refine_iter", type=_positive_int, metavar="N", default=2, help="refinement iterations per tracked frame (2)")


def _add_output_options(p, default_out):
    g = p.add_argument_group("output")
    g.add_argument("--out", "--debug_dir", type=Path, metavar="DIR", default=Path(default_out), help=f"output folder (default {default_out})")
    g.add_argument("--json", action="store_true", help="print one JSON summary object as the last line of stdout")
    g.add_argument("--debug", type=int, choices=range(0, 4), default=0, metavar="0..3",
                   help="2: scene_raw.ply, model_tf.obj, crop grids for the first frame; 3: for every frame")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chunkpose", description="6D pose estimation at full camera resolution under a memory budget.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{run,demo,bench}", parser_class=_Parser)

    run = sub.add_parser("run", help="poses for a YCBInEOAT scene (--scene) or a BOP scene (--bop)",
                         description="Register on the first frame with its mask and track the rest (YCBInEOAT), "
                                     "or register every annotated instance of a BOP scene.")
    src = run.add_argument_group("input")
    src.add_argument("--scene", "--test_scene_dir", type=Path, metavar="DIR", help="YCBInEOAT folder: rgb/, depth/ (uint16 mm), masks/, cam_K.txt")
    src.add_argument("--bop", type=Path, metavar="DATASET_DIR", help="BOP dataset folder (models/, <split>/)")
    src.add_argument("--split", default="test", metavar="NAME", help="BOP split folder (default test)")
    src.add_argument("--scene-id", type=_non_negative_int, metavar="N", help="BOP scene id")
    src.add_argument("--obj-id", type=_positive_int, metavar="ID", action="append", help="BOP: only these object ids (repeatable)")
    src.add_argument("--mesh", "--mesh_file", type=Path, metavar="FILE", help="object mesh in metres (BOP: default models/obj_XXXXXX.ply)")
    src.add_argument("--mesh-scale", type=_positive_float, metavar="S", default=None,
                     help="multiply mesh coordinates by this (0.001 for a mesh in millimetres)")
    size = src.add_mutually_exclusive_group()
    size.add_argument("--downscale", type=_positive_float, metavar="F", default=None, help="resize the input by this factor first")
    size.add_argument("--shorter-side", type=_positive_int, metavar="N", default=None, help="resize the input so its shorter side is N")
    src.add_argument("--zfar", type=_positive_float, metavar="Z", default=None, help="ignore depth at or beyond this many metres")
    src.add_argument("--frames", type=_positive_int, metavar="N", default=None, help="process at most N frames (images for BOP)")
    _add_estimator_options(run, 4.0)
    _add_output_options(run, "chunkpose_out")

    demo = sub.add_parser("demo", help="synthetic scene with ground truth, full resolution, under the budget",
                          description="Make a synthetic RGB-D scene, register and track at full resolution under the "
                                      "budget, print pose errors, peak memory and the chunk plan.")
    demo.add_argument("--width", type=_positive_int, default=3072)
    demo.add_argument("--height", type=_positive_int, default=2048)
    demo.add_argument("--frames", type=_positive_int, default=5, help="frames: 1 registration + tracking (5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--mesh", "--mesh_file", default=None, metavar="FILE|NAME",
                      help=f"object: a mesh file in metres or a builtin ({', '.join(DEMO_BUILTINS)}); "
                           f"default {DEMO_MESH} (asymmetric, so ADD is meaningful)")
    demo.add_argument("--mesh-scale", type=_positive_float, metavar="S", default=None,
                      help="multiply mesh coordinates by this (0.001 for a mesh in millimetres)")
    _add_estimator_options(demo, 1.0)
    _add_output_options(demo, "chunkpose_demo")

    bench = sub.add_parser("bench", help="run the benchmarks in benchmarks/ (source checkout)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


# --------------------------------------------------------------------------- helpers


def _resolve_device(name: str) -> str:
    if name != "auto":
        if name.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"--device {name} but CUDA is not available (use --device cpu)")
        elif name != "cpu":
            raise UserError(f"unknown --device {name!r} (use cpu, cuda or cuda:N)")
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_mesh(path, scale):
    from chunkpose.io.mesh import load_mesh

    try:
        return load_mesh(path, scale=scale)
    except ValueError as err:
        raise UserError(f"--mesh {path}: {err}") from None


def _pose_estimator(mesh, **kwargs):
    """chunkpose.PoseEstimator, imported only once the input has been checked (torch is slow
    to import and a typo in a path should be reported at once)."""
    from chunkpose import PoseEstimator

    return PoseEstimator(mesh, **kwargs)


def _make_estimator(factory, mesh, args, device, **more):
    kwargs = dict(budget_gb=args.budget_gb, device=device, refine_iterations=args.refine_iters,
                  track_iterations=args.track_iters, **more)
    if getattr(args, "weights", None) is not None:
        if not Path(args.weights).is_dir():
            raise UserError(f"--weights {args.weights} is not a folder (download the FoundationPose weights and pass their folder)")
        kwargs["weights"] = str(args.weights)
    return factory(mesh, **kwargs)


def _report_dict(report) -> dict:
    if report is None:
        return {}
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return dict(report) if isinstance(report, dict) else {}


def _run_length(sizes) -> str:
    """[64, 64, 64, 16] -> '64x3,16'."""
    parts, prev, count = [], None, 0
    for size in list(sizes) + [None]:
        if size == prev:
            count += 1
            continue
        if prev is not None:
            parts.append(f"{prev}x{count}" if count > 1 else str(prev))
        prev, count = size, 1
    return ",".join(parts) or "-"


def chunk_plan(report_dict: dict) -> dict:
    """Per stage: chunk sizes (run-length), chunks, items, measured and predicted peaks, retries, time."""
    stages = report_dict.get("stages") or {}
    plan = {}
    for name, st in (stages.items() if isinstance(stages, dict) else enumerate(stages)):
        if not isinstance(st, dict):
            continue
        plan[str(st.get("name", name))] = {
            "chunk_sizes": _run_length(st.get("chunk_sizes") or []),
            "chunks": st.get("n_chunks"),
            "items": st.get("items"),
            "peak_bytes": st.get("peak_bytes"),
            "predicted_peak_bytes": st.get("predicted_peak_bytes"),
            "retries": st.get("retries"),
            "wall_s": st.get("wall_s"),
        }
    return plan


_COUNTERS = ("calls", "n_chunks", "items", "retries", "estimations", "corrections")


def _this_call(d: dict, prev: dict | None, call: str) -> dict:
    """The part of a RunReport dict that belongs to the latest call.

    An engine may keep one report for its whole life (stages accumulate: chunk sizes
    appended, counters summed); then the stages of this call are the difference from the
    snapshot taken after the previous call, and its peak is the session peak of this kind
    of call (register or track).
    """
    out = dict(d)
    session = (d.get("sessions") or {}).get(call)
    if prev is None:
        if session:
            out["peak_bytes"] = session.get("peak_bytes", d.get("peak_bytes"))
        return out
    stages = {}
    before = prev.get("stages") or {}
    for name, st in (d.get("stages") or {}).items():
        p = before.get(name)
        if p is None:
            stages[name] = st
            continue
        if st.get("calls") == p.get("calls"):
            continue  # this stage did not run in this call
        q = dict(st)
        q["chunk_sizes"] = list(st.get("chunk_sizes") or [])[len(p.get("chunk_sizes") or []):]
        for key in _COUNTERS:
            if isinstance(st.get(key), (int, float)) and isinstance(p.get(key), (int, float)):
                q[key] = st[key] - p[key]
        q["wall_s"] = float(st.get("wall_s") or 0) - float(p.get("wall_s") or 0)
        stages[name] = q
    out["stages"] = stages
    if session:
        out["peak_bytes"] = session.get("peak_bytes", d.get("peak_bytes"))
    return out


class _ReportReader:
    """Reads each call's RunReport right after the call (the object may be reused)."""

    def __init__(self):
        self._last = {}  # id(estimator) -> (report object, its dict after the previous call)

    def fields(self, est, result, call: str) -> dict:
        report = getattr(result, "report", None)
        d = _report_dict(report)
        last = self._last.get(id(est))
        prev = last[1] if last is not None and last[0] is report else None
        self._last[id(est)] = (report, d)
        d = _this_call(d, prev, call)
        peak = d.get("peak_bytes")
        if peak is None:
            peak = getattr(report, "peak_bytes", None)
        downscale = d.get("downscale_factor", getattr(report, "downscale_factor", 1.0))
        out = {"peak_bytes": peak, "downscale_factor": float(downscale) if downscale is not None else None,
               "chunk_plan": chunk_plan(d), "engine": d}
        if d.get("downscale_reason"):
            out["downscale_reason"] = d["downscale_reason"]
        return out


def _model_points(mesh) -> np.ndarray:
    return np.asarray(mesh.vertices, dtype=np.float64)


def _mesh_bounds(mesh) -> np.ndarray:
    v = np.asarray(mesh.vertices, dtype=np.float64)
    return np.stack([v.min(axis=0), v.max(axis=0)])


def _progress(iterable, total, desc, enabled=True):
    from tqdm.auto import tqdm

    # disable=None turns the bar off when stderr is not a terminal (logs, tests, pipes).
    return tqdm(iterable, total=total, desc=desc, unit="frame", disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True)


class _StageBar:
    """A second progress bar naming the engine stage a register call is in.

    The estimator has no progress callback; its engine's RunReport gains one entry per
    stage as the call goes, so a background thread reads the stage names from it (read
    only) a few times a second. Only on a terminal.
    """

    def __init__(self, estimator, desc):
        self.estimator, self.desc = estimator, desc
        self.enabled = sys.stderr.isatty() and getattr(getattr(estimator, "engine", None), "report", None) is not None
        self._stop = None

    def __enter__(self):
        if not self.enabled:
            return self
        import threading

        from tqdm.auto import tqdm

        self._bar = tqdm(total=None, desc=self.desc, leave=False, file=sys.stderr, bar_format="{desc} [{elapsed}]")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _calls(self) -> dict:
        stages = self.estimator.engine.report.stages
        return {name: getattr(st, "calls", 0) for name, st in list(stages.items())}

    def _watch(self):
        try:
            last = self._calls()
        except Exception:
            last = {}
        while not self._stop.wait(0.25):
            try:
                now = self._calls()
            except Exception:  # the report may change under us; try again next time
                continue
            changed = [name for name, calls in now.items() if last.get(name) != calls]
            if changed:
                self._bar.set_description_str(f"{self.desc}: {changed[-1]}")
            last = now

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=1)
            self._bar.close()
        return False


def _remove(paths):
    import shutil

    for path in paths:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _register(est, frame_args, desc="register"):
    with _StageBar(est, desc):
        return est.register(*frame_args)


@dataclass
class _RunState:
    records: list = field(default_factory=list)
    interrupted: bool = False
    started: float = field(default_factory=time.perf_counter)


def _write_debug(tmp: Path, folder: str, frame, mesh, pose, result, mask=None):
    from chunkpose.io.debug import write_crop_grid, write_mesh_at_pose, write_scene_raw

    out = tmp / "debug" / folder
    out.mkdir(parents=True, exist_ok=True)
    write_scene_raw(out / "scene_raw.ply", frame.depth, frame.K, frame.rgb)
    write_mesh_at_pose(out / "model_tf.obj", mesh, pose)
    if mask is not None:
        import cv2

        cv2.imwrite(str(out / "ob_mask.png"), np.asarray(mask, np.uint8) * 255)
    # The estimator may expose the crops of its best hypotheses (optional): a tensor
    # (B,C,h,w), a list of such batches, or a dict name -> batch; scores label the tiles.
    crops = getattr(result, "debug_crops", None)
    if crops is not None:
        try:
            if isinstance(crops, dict):
                crops = [v for v in crops.values() if getattr(v, "ndim", 0) == 4]
            scores = getattr(result, "debug_scores", None)
            labels = None if scores is None else [f"{float(x):.3f}" for x in scores]
            if len(crops):
                write_crop_grid(out / "crops.png", crops, labels=labels)
        except Exception as err:  # a debug picture must never fail the run
            print(f"chunkpose: warning: could not draw the crop grid ({err})", file=sys.stderr)


def _error_fields(pose, gt, points, diameter=None, symmetric=False) -> dict:
    from chunkpose.metrics import pose_errors

    if gt is None:
        return {}
    e = pose_errors(pose, gt, points)
    out = {"add": e["add"], "add_s": e["add_s"], "rot_deg": e["rot_deg"], "trans_m": e["trans_m"]}
    if diameter:
        out["diameter"] = float(diameter)
    out["add_or_adds"] = e["add_s"] if symmetric else e["add"]
    return out


def _summary(records, budget_bytes, interrupted, total_time, extra=None) -> dict:
    from chunkpose.metrics import auc, recall_at_diameter

    peaks = [r["peak_bytes"] for r in records if r.get("peak_bytes") is not None]
    factors = [r["downscale_factor"] for r in records if r.get("downscale_factor") is not None]
    s = {
        "frames_done": len(records),
        "interrupted": interrupted,
        "total_time_s": total_time,
        "peak_bytes": max(peaks) if peaks else None,
        "budget_bytes": budget_bytes,
        "within_budget": (max(peaks) <= budget_bytes) if peaks and budget_bytes else None,
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


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _fmt_score(x):
    return "-" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _fmt_mm(x):
    return "-" if x is None else f"{x * 1000:.1f}"


def _print_summary(records, summary, title, to_stderr):
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stderr if to_stderr else sys.stdout, width=120)
    table = Table(title=title)
    for col in ("frame", "stage", "score", "ADD mm", "ADD-S mm", "rot deg", "time s", "peak", "downscale"):
        table.add_column(col, justify="right" if col not in ("frame", "stage") else "left")
    shown = records if len(records) <= 40 else records[:20] + records[-20:]
    for r in shown:
        table.add_row(
            str(r["frame"]), r.get("stage", ""), _fmt_score(r.get("score")),
            _fmt_mm(r.get("add")), _fmt_mm(r.get("add_s")),
            "-" if r.get("rot_deg") is None else f"{r['rot_deg']:.2f}", f"{r['time_s']:.2f}",
            _fmt_bytes(r.get("peak_bytes")), f"{r.get('downscale_factor') or 1.0:g}",
        )
    console.print(table)
    lines = [f"frames: {summary['frames_done']}" + (" (interrupted)" if summary["interrupted"] else ""),
             f"peak memory: {_fmt_bytes(summary.get('peak_bytes'))} of budget {_fmt_bytes(summary.get('budget_bytes'))}"
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


def _print_chunk_plan(plan: dict, to_stderr):
    """The engine's per-stage chunk plan of the registration call, as a table."""
    if not plan:
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stderr if to_stderr else sys.stdout, width=120)
    table = Table(title="chunk plan (registration)")
    for col in ("stage", "items", "chunk sizes", "peak", "predicted", "retries", "time s"):
        table.add_column(col, justify="left" if col in ("stage", "chunk sizes") else "right")
    for name, st in plan.items():
        table.add_row(name, str(st.get("items", "-")), str(st.get("chunk_sizes", "-")), _fmt_bytes(st.get("peak_bytes")),
                      _fmt_bytes(st.get("predicted_peak_bytes")), str(st.get("retries", "-")),
                      "-" if st.get("wall_s") is None else f"{st['wall_s']:.2f}")
    console.print(table)


def _json_line(command, out, records, summary, extra=None) -> str:
    from chunkpose.outputs import to_jsonable

    frames = [{k: r.get(k) for k in ("frame", "stage", "obj_id", "pose", "score", "time_s", "peak_bytes",
                                      "downscale_factor", "add", "add_s", "rot_deg", "trans_m") if k in r}
              for r in records]
    obj = {"command": command, "out": str(out), "frames": frames, **summary}
    if extra:
        obj.update(extra)
    return json.dumps(to_jsonable(obj), separators=(",", ":"))


# --------------------------------------------------------------------------- run


def _budget_bytes(args):
    return None if args.budget_gb is None else int(args.budget_gb * 2**30)


def _finish(args, od, tmp, command, state, report_head, title, plan=None, extra_json=None):
    """Write report.json, move the folder into place, print the summary (and --json)."""
    from chunkpose.outputs import write_json

    total = time.perf_counter() - state.started
    summary = _summary(state.records, _budget_bytes(args), state.interrupted, total)
    summary["out"] = str(od.final)
    report = {**report_head, "summary": summary, "frames": state.records}
    write_json(tmp / "report.json", report)
    od.commit()
    if plan:
        _print_chunk_plan(plan, to_stderr=args.json)
    _print_summary(state.records, summary, title, to_stderr=args.json)
    if args.json:
        sys.stdout.flush()
        print(_json_line(command, od.final, state.records, summary, extra_json))
    return EXIT_INTERRUPTED if state.interrupted else EXIT_OK


def _head(args, command, device, **more):
    from chunkpose import __version__

    return {"chunkpose_version": __version__, "command": command, "argv": sys.argv[1:], "device": device,
            "budget_gb": args.budget_gb, "budget_bytes": _budget_bytes(args),
            "refine_iterations": args.refine_iters, "track_iterations": args.track_iters, **more}


def _register_and_track(args, est, frames, n, mesh, tmp, state) -> dict | None:
    """Register on the first of `frames` (an iterable of io.readers.Frame, n of them),
    track the rest; writes ob_in_cam/, vis/ and debug files into tmp and appends one record
    per finished frame to state. Ctrl-C keeps the finished frames. Returns the registration's
    chunk plan."""
    from chunkpose.outputs import write_pose_txt
    from chunkpose.vis import overlay, save_rgb

    points, bounds = _model_points(mesh), _mesh_bounds(mesh)
    reports = _ReportReader()
    plan = None
    (tmp / "ob_in_cam").mkdir()
    (tmp / "vis").mkdir()
    written = []
    try:
        for i, frame in enumerate(_progress(frames, n, "frames")):
            stage = "register" if i == 0 else "track"
            t0 = time.perf_counter()
            if i == 0:
                result = _register(est, (frame.rgb, frame.depth, frame.K, frame.mask))
            else:
                result = est.track(frame.rgb, frame.depth, frame.K)
            elapsed = time.perf_counter() - t0
            pose = np.asarray(result.pose, dtype=np.float64)
            written = [tmp / "ob_in_cam" / f"{frame.name}.txt", tmp / "vis" / f"{frame.name}.png"]
            write_pose_txt(written[0], pose)
            save_rgb(written[1], overlay(frame.rgb, pose, frame.K, bounds, gt_poses=frame.gt_pose, label=frame.name))
            if args.debug >= 3 or (args.debug >= 2 and i == 0):
                written.append(tmp / "debug" / frame.name)
                _write_debug(tmp, frame.name, frame, mesh, pose, result, frame.mask if i == 0 else None)
            fields = reports.fields(est, result, stage)
            if i == 0:
                plan = fields["chunk_plan"]
            record = {"frame": frame.name, "stage": stage, "pose": pose,
                      "score": None if getattr(result, "score", None) is None else float(result.score),
                      "time_s": elapsed, "input_resize": frame.extra.get("resize_factor", 1.0), **fields,
                      **_error_fields(pose, frame.gt_pose, points, mesh.diameter)}
            if frame.gt_pose is not None:
                record["gt_pose"] = np.asarray(frame.gt_pose, np.float64)
            state.records.append(record)
            written = []
    except KeyboardInterrupt:
        state.interrupted = True
        _remove(written)  # the frame being written when interrupted is not kept
    return plan


def run_ycbineoat(args, estimator_factory) -> int:
    from chunkpose.io.readers import YCBInEOATReader
    from chunkpose.outputs import OutputDir

    if args.mesh is None:
        raise UserError("--mesh FILE is required with --scene (the object model in metres)")
    reader = YCBInEOATReader(args.scene, downscale=args.downscale, shorter_side=args.shorter_side, zfar=args.zfar)
    first = reader.frame(0, need_mask=True)  # validates the scene before anything is written
    mesh = _load_mesh(args.mesh, args.mesh_scale)
    od = OutputDir(args.out)
    device = _resolve_device(args.device)
    est = _make_estimator(estimator_factory, mesh, args, device)
    n = len(reader) if args.frames is None else min(args.frames, len(reader))
    frames = (first if i == 0 else reader.frame(i) for i in range(n))
    state = _RunState()
    with od as tmp:
        plan = _register_and_track(args, est, frames, n, mesh, tmp, state)
        head = _head(args, "run", device, layout="ycbineoat", scene=str(Path(args.scene).resolve()),
                     mesh=str(Path(args.mesh).resolve()), frames_total=n, zfar=args.zfar,
                     downscale=args.downscale, shorter_side=args.shorter_side)
        return _finish(args, od, tmp, "run", state, head, f"chunkpose run: {Path(args.scene).name}", plan)


def run_bop(args, estimator_factory) -> int:
    from chunkpose.io.readers import BOPReader
    from chunkpose.outputs import OutputDir, bop_csv_row, write_bop_csv, write_pose_txt
    from chunkpose.vis import overlay, save_rgb

    if args.scene_id is None:
        raise UserError("--scene-id N is required with --bop (the scene folder number under the split)")
    reader = BOPReader(args.bop, split=args.split, scene_id=args.scene_id, downscale=args.downscale,
                       shorter_side=args.shorter_side, zfar=args.zfar)
    if not (reader.scene_dir / "mask_visib").is_dir():
        raise UserError(f"missing {reader.scene_dir / 'mask_visib'} (chunkpose registers annotated instances "
                        "from their visible masks; get the BOP scene with mask_visib/)")
    reader.frame(0)  # validates the first image before anything is written
    device = _resolve_device(args.device)
    meshes, estimators = {}, {}

    def mesh_for(obj_id):
        if obj_id not in meshes:
            if args.mesh is not None:
                meshes[obj_id] = _load_mesh(args.mesh, args.mesh_scale)
            else:  # BOP models are in millimetres
                meshes[obj_id] = _load_mesh(reader.model_path(obj_id), args.mesh_scale or 0.001)
        return meshes[obj_id]

    def estimator_for(obj_id):
        if obj_id not in estimators:
            # the model's own symmetries (BOP models are in millimetres), unless --mesh replaces it
            symmetries = None if args.mesh is not None else reader.symmetry_transforms(obj_id, scale=args.mesh_scale or 0.001)
            more = {} if symmetries is None else {"symmetry_tfs": symmetries}
            estimators[obj_id] = _make_estimator(estimator_factory, mesh_for(obj_id), args, device, **more)
        return estimators[obj_id]

    # Load the meshes of the first image now so that a bad model fails before any output.
    wanted = set(args.obj_id or [])
    for gt in reader.scene_gt[str(reader.image_ids[0])]:
        if not wanted or int(gt["obj_id"]) in wanted:
            mesh_for(int(gt["obj_id"]))
    od = OutputDir(args.out)
    n = len(reader) if args.frames is None else min(args.frames, len(reader))
    state = _RunState()
    reports = _ReportReader()
    csv_rows = []
    plan = None
    dataset = Path(args.bop).resolve().name
    csv_name = f"chunkpose_{dataset}-{args.split}.csv"
    with od as tmp:
        (tmp / "ob_in_cam").mkdir()
        (tmp / "vis").mkdir()
        written = []
        try:
            for i in _progress(range(n), n, "images"):
                frame, instances = reader.frame(i)
                instances = [inst for inst in instances if not wanted or inst.obj_id in wanted]
                image_records, image_rows, poses, gts, boxes = [], [], [], [], []
                t_image = time.perf_counter()
                for inst in instances:
                    mesh = mesh_for(inst.obj_id)
                    est = estimator_for(inst.obj_id)
                    t0 = time.perf_counter()
                    result = _register(est, (frame.rgb, frame.depth, frame.K, inst.mask), f"register {inst.name}")
                    elapsed = time.perf_counter() - t0
                    pose = np.asarray(result.pose, dtype=np.float64)
                    path = tmp / "ob_in_cam" / f"{inst.name}.txt"
                    written.append(path)
                    write_pose_txt(path, pose)
                    info = reader.model_info(inst.obj_id)
                    if args.debug >= 3 or (args.debug >= 2 and i == 0):
                        written.append(tmp / "debug" / inst.name)
                        _write_debug(tmp, inst.name, frame, mesh, pose, result, inst.mask)
                    fields = reports.fields(est, result, "register")
                    if plan is None:
                        plan = fields["chunk_plan"]
                    score = float(getattr(result, "score", 0.0) or 0.0)
                    image_records.append({
                        "frame": inst.name, "stage": "register", "im_id": inst.im_id, "gt_index": inst.gt_index,
                        "obj_id": inst.obj_id, "pose": pose, "score": score, "time_s": elapsed,
                        "input_resize": frame.extra.get("resize_factor", 1.0), **fields,
                        **_error_fields(pose, inst.gt_pose, _model_points(mesh), info.get("diameter", mesh.diameter),
                                        info.get("symmetric", False)),
                    })
                    image_rows.append((inst, score, pose))
                    poses.append(pose)
                    gts.append(inst.gt_pose)
                    boxes.append(_mesh_bounds(mesh))
                image_time = time.perf_counter() - t_image
                if poses:
                    path = tmp / "vis" / f"{frame.name}.png"
                    written.append(path)
                    save_rgb(path, overlay(frame.rgb, poses, frame.K, boxes, gt_poses=gts, label=frame.name))
                # BOP: "time" is the time for the whole image, the same for all its estimates.
                csv_rows += [bop_csv_row(args.scene_id, inst.im_id, inst.obj_id, score, pose, image_time)
                             for inst, score, pose in image_rows]
                state.records += image_records
                written = []
        except KeyboardInterrupt:
            state.interrupted = True
            _remove(written)
        write_bop_csv(tmp / csv_name, csv_rows)
        head = _head(args, "run", device, layout="bop", dataset=str(Path(args.bop).resolve()), split=args.split,
                     scene_id=args.scene_id, images_total=n, results_csv=csv_name, zfar=args.zfar,
                     downscale=args.downscale, shorter_side=args.shorter_side)
        return _finish(args, od, tmp, "run", state, head, f"chunkpose run: BOP {dataset} {args.split} scene {args.scene_id}",
                       plan, extra_json={"results_csv": str(Path(od.final) / csv_name)})


# --------------------------------------------------------------------------- demo


def _demo_mesh(args):
    """The demo's object: a builtin name (as is, for synth) or a loaded mesh file."""
    choice = args.mesh if args.mesh is not None else DEMO_MESH
    if args.mesh_scale is None and str(choice) in DEMO_BUILTINS:
        return str(choice)
    if str(choice) in DEMO_BUILTINS:
        from chunkpose.shapes import builtin_meshes

        choice = builtin_meshes()[str(choice)]
    elif not Path(choice).is_file():
        raise UserError(f"--mesh {choice}: no such file (give a mesh file or one of {', '.join(DEMO_BUILTINS)})")
    return _load_mesh(choice, args.mesh_scale)


def run_demo(args, estimator_factory) -> int:
    import chunkpose.synth as synth
    from chunkpose.io.readers import Frame
    from chunkpose.outputs import OutputDir

    od = OutputDir(args.out)
    device = _resolve_device(args.device)
    demo_mesh = _demo_mesh(args)  # a bad --mesh fails before anything is made
    t_scene = time.perf_counter()
    print(f"making a {args.width}x{args.height} synthetic scene with {args.frames} frames...", file=sys.stderr)
    scene = synth.make_scene(mesh=demo_mesh, width=args.width, height=args.height, frames=args.frames,
                             seed=args.seed)
    scene_time = time.perf_counter() - t_scene
    mesh = scene.mesh
    est = _make_estimator(estimator_factory, mesh, args, device)
    K = np.asarray(scene.K, dtype=np.float64)
    frames = (Frame(f"{i:06d}", scene.rgb[i], scene.depth[i], K, scene.masks[i] if i == 0 else None,
                    np.asarray(scene.poses[i], np.float64)) for i in range(args.frames))
    state = _RunState()
    with od as tmp:
        plan = _register_and_track(args, est, frames, args.frames, mesh, tmp, state)
        head = _head(args, "demo", device, width=args.width, height=args.height, frames_total=args.frames,
                     seed=args.seed, scene_time_s=scene_time, mesh_diameter=float(mesh.diameter),
                     mesh=scene.info.get("object") if scene.info.get("object") != "user mesh" else str(args.mesh))
        return _finish(args, od, tmp, "demo", state, head, f"chunkpose demo {args.width}x{args.height}", plan,
                       extra_json={"width": args.width, "height": args.height})


# --------------------------------------------------------------------------- bench


def _benchmark_scripts(bench: Path) -> dict:
    """name -> script for the runnable benchmarks (benchmarks/<name>.py, helpers excluded)."""
    if not bench.is_dir():
        return {}
    return {p.stem: p for p in sorted(bench.glob("*.py")) if not p.stem.startswith("_") and p.stem != "common"}


def run_bench(args) -> int:
    """``chunkpose bench NAME [ARGS...]`` runs benchmarks/NAME.py ARGS; ``all`` runs each in
    turn; no name lists them. Needs a source checkout (benchmarks/ is not installed)."""
    root = Path(__file__).resolve().parent.parent
    scripts = _benchmark_scripts(root / "benchmarks")
    if not scripts:
        raise UserError(f"no benchmarks in {root / 'benchmarks'} (chunkpose bench needs a source checkout)")
    forwarded = list(args.bench_args or [])
    if not forwarded or forwarded[0] in ("-h", "--help"):
        print("usage: chunkpose bench {" + ",".join([*scripts, "all"]) + "} [ARGS...]")
        print("runs benchmarks/NAME.py with ARGS (e.g. --quick); 'all' runs each of them")
        return EXIT_OK
    name, rest = forwarded[0], forwarded[1:]
    if name == "all":
        chosen = list(scripts.values())
    elif name in scripts:
        chosen = [scripts[name]]
    else:
        raise UserError(f"unknown benchmark {name!r} (choose one of: {', '.join(scripts)}, all)")
    for script in chosen:
        rc = subprocess.call([sys.executable, str(script), *rest], cwd=str(root))
        if rc != 0:
            return rc
    return EXIT_OK


# --------------------------------------------------------------------------- main


def _user_error_types():
    from chunkpose.io.readers import SceneError
    from chunkpose.outputs import OutputFolderError

    types = [UserError, SceneError, OutputFolderError]
    try:
        from chunkpose.engine import BudgetTooSmall

        types.append(BudgetTooSmall)
    except Exception:  # the engine may be unavailable in a broken install; still report input errors
        pass
    return tuple(types)


def _one_line(err) -> str:
    text = " ".join(str(err).split())
    minimum = getattr(err, "minimum_bytes", None)
    if minimum:  # BudgetTooSmall speaks library (budget_gb=); say it in command-line words
        import math
        import re

        text = re.sub(r";? ?pass budget_gb>=\S+$", "", text)
        text += f" (pass --budget-gb {math.ceil(minimum / 2**30 * 1000) / 1000:g} or more)"
    return text or type(err).__name__


def main(argv=None, estimator_factory=None) -> int:
    """Entry point. ``estimator_factory(mesh, **kwargs)`` defaults to chunkpose.PoseEstimator
    (the argument exists so that the command loop can be tested without the networks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = bool(os.environ.get("CHUNKPOSE_TRACEBACK"))
    try:
        parser = build_parser()
        if argv and argv[0] == "bench":  # everything after "bench" belongs to the benchmarks
            return run_bench(argparse.Namespace(bench_args=argv[1:]))
        args = parser.parse_args(argv)
        if args.version:
            from chunkpose import __version__

            print(__version__)
            return EXIT_OK
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        factory = estimator_factory or _pose_estimator
        if args.command == "run":
            if (args.scene is None) == (args.bop is None):
                raise UserError("give exactly one of --scene DIR (YCBInEOAT) or --bop DATASET_DIR (BOP)")
            return run_bop(args, factory) if args.bop is not None else run_ycbineoat(args, factory)
        if args.command == "demo":
            return run_demo(args, factory)
        raise UserError(f"unknown command {args.command!r} (use run, demo or bench)")
    except KeyboardInterrupt:
        print("chunkpose: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if show_traceback:
            raise
        if isinstance(err, _user_error_types()) or _is_input_value_error(err):
            print(f"chunkpose: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _is_input_value_error(err) -> bool:
    """ValueErrors raised by the estimator for bad input (empty mask, NaN depth...) are the
    user's to fix; they name the argument and the fix (project convention)."""
    return type(err) is ValueError


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
