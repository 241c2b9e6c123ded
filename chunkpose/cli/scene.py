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


def scene_mesh(args, scene_dir):
    """(Mesh, path) of a scene's object: --mesh, else the one mesh saved in the scene's mesh/."""
    from chunkpose.io.readers import scene_meshes

    if args.mesh is not None:
        return calls.load_mesh(args.mesh, args.mesh_scale), Path(args.mesh)
    meshes = scene_meshes(scene_dir)
    if len(meshes) == 1:
        path = next(iter(meshes.values()))
        return calls.load_mesh(path, args.mesh_scale), path
    if not meshes:
        raise UserError(f"--mesh FILE is required: {scene_dir} has no mesh/ folder (the object model in metres)")
    raise UserError(f"{Path(scene_dir) / 'mesh'} holds {len(meshes)} meshes ({', '.join(meshes)}); "
                    "pass the object's with --mesh FILE")


def _reader(args, scene_dir):
    from chunkpose.io.readers import YCBInEOATReader

    reader = YCBInEOATReader(scene_dir, downscale=args.downscale, shorter_side=args.shorter_side, zfar=args.zfar)
    return reader, reader.frame(0, need_mask=True)  # validates the scene before anything is written


def _frames(args, reader, first):
    n = len(reader) if args.frames is None else min(args.frames, len(reader))
    return (first if i == 0 else reader.frame(i) for i in range(n)), n


def run_ycbineoat(args, estimator_factory) -> int:
    from chunkpose.io.results import OutputDir

    reader, first = _reader(args, args.scene)
    mesh, mesh_path = scene_mesh(args, args.scene)
    od = OutputDir(args.out)
    device = calls.resolve_device(args.device)
    est = calls.make_estimator(estimator_factory, mesh, args, device)
    frames, n = _frames(args, reader, first)
    state = calls.RunState()
    with od as tmp:
        plan = register_and_track(args, est, frames, n, mesh, tmp, state)
        report_head = summary.head(args, "run", device, layout="ycbineoat", scene=str(Path(args.scene).resolve()),
                                   mesh=str(Path(mesh_path).resolve()), frames_total=n, zfar=args.zfar,
                                   downscale=args.downscale, shorter_side=args.shorter_side)
        return summary.finish(args, od, tmp, "run", state, report_head, f"chunkpose run: {Path(args.scene).name}", plan)


class ScenesRun:
    """``run --scenes DIR``: every YCBInEOAT scene folder in DIR (one with rgb/), each a whole
    video registered on its first frame and tracked, its outputs in ``<out>/<scene>/``. All
    scenes and their meshes are checked before any output."""

    def __init__(self, args, factory, device=None):
        root = Path(args.scenes)
        if not root.is_dir():
            raise UserError(f"--scenes {root}: no such folder (a folder of YCBInEOAT scene folders)")
        self.args, self.factory, self.root = args, factory, root
        self.names = sorted(p.name for p in root.iterdir() if (p / "rgb").is_dir())
        if not self.names:
            raise UserError(f"--scenes {root}: no scene folders in it (each needs rgb/, depth/, masks/, cam_K.txt)")
        for name in self.names:
            _reader(args, root / name)
            scene_mesh(args, root / name)
        self.device = calls.resolve_device(args.device) if device is None else str(device)

    def process(self, name: str, scratch: Path) -> dict:
        """One video into ``scratch/<name>/``; records carry "scene". Ctrl-C propagates after
        the finished frames are recorded."""
        reader, first = _reader(self.args, self.root / name)
        mesh, _ = scene_mesh(self.args, self.root / name)
        est = calls.make_estimator(self.factory, mesh, self.args, self.device)
        frames, n = _frames(self.args, reader, first)
        state = calls.RunState()
        (scratch / name).mkdir(parents=True, exist_ok=True)
        plan = register_and_track(self.args, est, frames, n, mesh, scratch / name, state)
        for record in state.records:
            record["scene"] = name
        return {"records": state.records, "plan": plan, "interrupted": state.interrupted}

    def head(self, device) -> dict:
        args = self.args
        return summary.head(args, "run", device, layout="ycbineoat", scenes_dir=str(self.root.resolve()),
                            scenes=self.names, zfar=args.zfar, downscale=args.downscale,
                            shorter_side=args.shorter_side)


def run_scenes(args, estimator_factory) -> int:
    from chunkpose.cli.ranks import UnitWork, rank_context, run_on_ranks
    from chunkpose.io.results import OutputDir

    ctx = rank_context(args)
    title = f"chunkpose run: scenes in {Path(args.scenes).name}"
    if ctx is not None:
        run = ScenesRun(args, estimator_factory, device=ctx.device)

        def process(name, scratch):
            done = run.process(name, scratch)
            if done["interrupted"]:
                raise KeyboardInterrupt
            return done

        return run_on_ranks(args, ctx, UnitWork(run.names, process, lambda folder, results: None,
                                                run.head(str(ctx.device)), title))
    run = ScenesRun(args, estimator_factory)
    od = OutputDir(args.out)
    state, plan = calls.RunState(), None
    with od as tmp:
        for name in progress(run.names, len(run.names), "scenes"):
            done = run.process(name, tmp)
            state.records += done["records"]
            plan = plan or done["plan"]
            if done["interrupted"]:
                state.interrupted = True
                break
        return summary.finish(args, od, tmp, "run", state, run.head(run.device), title, plan)
