"""``chunkpose run --scene DIR``: register on a YCBInEOAT video's first frame, track the rest."""
from __future__ import annotations

from pathlib import Path

from chunkpose.cli import calls, summary
from chunkpose.cli.debug import write_debug
from chunkpose.cli.parser import UserError
from chunkpose.cli.progress import progress


def register_and_track(args, est, frames, n, mesh, tmp, state) -> dict | None:
    """Register on the first of ``frames`` (io.scene_files.Frame, n of them), track the rest;
    write ob_in_cam/, vis/ and debug files into tmp and append one record per finished frame
    to state. Ctrl-C keeps the finished frames. Returns the registration's chunk plan."""
    from chunkpose.io.results import write_pose_txt
    from chunkpose.vis import overlay, save_rgb

    bounds = calls.mesh_bounds(mesh)
    plan = None
    (tmp / "ob_in_cam").mkdir()
    (tmp / "vis").mkdir()
    written = []
    try:
        for i, frame in enumerate(progress(frames, n, "frames")):
            stage = "register" if i == 0 else "track"
            if i == 0:
                result, elapsed = calls.timed(calls.register, est, (frame.rgb, frame.depth, frame.K, frame.mask))
            else:
                result, elapsed = calls.timed(est.track, frame.rgb, frame.depth, frame.K)
            record = calls.pose_record(frame.name, stage, result, elapsed, frame.extra.get("resize_factor", 1.0),
                                       frame.gt_pose, mesh)
            written = [tmp / "ob_in_cam" / f"{frame.name}.txt", tmp / "vis" / f"{frame.name}.png"]
            write_pose_txt(written[0], record["pose"])
            save_rgb(written[1], overlay(frame.rgb, record["pose"], frame.K, bounds, gt_poses=frame.gt_pose,
                                         label=frame.name))
            if args.debug >= 3 or (args.debug >= 2 and i == 0):
                written.append(tmp / "debug" / frame.name)
                write_debug(tmp, frame.name, frame, mesh, record["pose"], result, est, frame.mask if i == 0 else None)
            if i == 0:
                plan = record["chunk_plan"]
            state.records.append(record)
            written = []
    except KeyboardInterrupt:
        state.interrupted = True
        calls.remove(written)  # the frame being written when interrupted is not kept
    return plan


def run_ycbineoat(args, estimator_factory) -> int:
    from chunkpose.io.readers import YCBInEOATReader
    from chunkpose.io.results import OutputDir

    if args.mesh is None:
        raise UserError("--mesh FILE is required with --scene (the object model in metres)")
    reader = YCBInEOATReader(args.scene, downscale=args.downscale, shorter_side=args.shorter_side, zfar=args.zfar)
    first = reader.frame(0, need_mask=True)  # validates the scene before anything is written
    mesh = calls.load_mesh(args.mesh, args.mesh_scale)
    od = OutputDir(args.out)
    device = calls.resolve_device(args.device)
    est = calls.make_estimator(estimator_factory, mesh, args, device)
    n = len(reader) if args.frames is None else min(args.frames, len(reader))
    frames = (first if i == 0 else reader.frame(i) for i in range(n))
    state = calls.RunState()
    with od as tmp:
        plan = register_and_track(args, est, frames, n, mesh, tmp, state)
        report_head = summary.head(args, "run", device, layout="ycbineoat", scene=str(Path(args.scene).resolve()),
                                   mesh=str(Path(args.mesh).resolve()), frames_total=n, zfar=args.zfar,
                                   downscale=args.downscale, shorter_side=args.shorter_side)
        return summary.finish(args, od, tmp, "run", state, report_head, f"chunkpose run: {Path(args.scene).name}", plan)
