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
    from chunkpose.vis import LOST_COLOUR, overlay, save_rgb

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
                # a mask of this frame, where the scene has one, is what re-registration starts from
                more = () if frame.mask is None else (frame.mask,)
                result, elapsed = calls.timed(est.track, frame.rgb, frame.depth, frame.K, *more)
            record = calls.pose_record(frame.name, stage, result, elapsed, frame.extra.get("resize_factor", 1.0),
                                       frame.gt_pose, mesh)
            written = [tmp / "ob_in_cam" / f"{frame.name}.txt", tmp / "vis" / f"{frame.name}.png"]
            write_pose_txt(written[0], record["pose"])
            save_rgb(written[1], overlay(frame.rgb, record["pose"], frame.K, bounds, gt_poses=frame.gt_pose,
                                         label=track_label(frame.name, record),
                                         colour=LOST_COLOUR if record.get("lost") and not record.get("reregistered")
                                         else None))
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


def track_label(name: str, record: dict) -> str:
    """The overlay's text: the frame, its health figure and whether the track was lost or found again."""
    health = record.get("health")
    if health is None:
        return name
    state = " RE-REGISTERED" if record.get("reregistered") else " LOST" if record.get("lost") else ""
    return f"{name}  health {health:.2f}{state}"


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


def _reader(args, scene_dir, need_mask=True):
    from chunkpose.io.readers import YCBInEOATReader

    reader = YCBInEOATReader(scene_dir, downscale=args.downscale, shorter_side=args.shorter_side, zfar=args.zfar)
    return reader, reader.frame(0, need_mask=need_mask)  # validates the scene before anything is written


def _frames(args, reader, first):
    n = len(reader) if args.frames is None else min(args.frames, len(reader))
    return (first if i == 0 else reader.frame(i) for i in range(n)), n


class Video:
    """One YCBInEOAT scene folder, checked (frames, masks, meshes) before any output: one object
    (masks/<frame>.png) or several (masks/<name>/ or labels/, chunkpose.cli.objects)."""

    def __init__(self, args, scene_dir):
        from chunkpose.cli.objects import first_masks, scene_objects

        self.args, self.dir = args, Path(scene_dir)
        self.objects = scene_objects(args, self.dir)
        self.reader, self.first = _reader(args, self.dir, need_mask=self.objects is None)
        if self.objects is None:
            self.mesh, self.mesh_path = scene_mesh(args, self.dir)
        else:
            first_masks(self.dir, self.first, self.objects)

    def head_fields(self) -> dict:
        if self.objects is None:
            return {"mesh": str(Path(self.mesh_path).resolve())}
        return {"objects": {name: str(Path(path).resolve()) for name, (_, path) in self.objects.items()}}

    def run(self, factory, device, out: Path, state) -> dict | None:
        """Register and track into ``out``; returns the registration's chunk plan."""
        from chunkpose.cli.objects import multi_estimator, register_and_track_objects

        n = len(self.reader) if self.args.frames is None else min(self.args.frames, len(self.reader))
        if self.objects is not None:
            est = multi_estimator(self.args, self.objects, device)
            return register_and_track_objects(self.args, est, self.reader, n, self.objects, self.dir, out, state)
        est = calls.make_estimator(factory, self.mesh, self.args, device)
        frames, n = _frames(self.args, self.reader, self.first)
        return register_and_track(self.args, est, frames, n, self.mesh, out, state)


def run_ycbineoat(args, estimator_factory) -> int:
    from chunkpose.io.results import OutputDir

    video = Video(args, args.scene)
    od = OutputDir(args.out)
    device = calls.resolve_device(args.device)
    state = calls.RunState()
    with od as tmp:
        plan = video.run(estimator_factory, device, tmp, state)
        n = len(video.reader) if args.frames is None else min(args.frames, len(video.reader))
        report_head = summary.head(args, "run", device, layout="ycbineoat", scene=str(Path(args.scene).resolve()),
                                   **video.head_fields(), frames_total=n, zfar=args.zfar,
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
            Video(args, root / name)
        self.device = calls.resolve_device(args.device) if device is None else str(device)

    def process(self, name: str, scratch: Path) -> dict:
        """One video into ``scratch/<name>/``; records carry "scene". Ctrl-C propagates after
        the finished frames are recorded."""
        state = calls.RunState()
        (scratch / name).mkdir(parents=True, exist_ok=True)
        plan = Video(self.args, self.root / name).run(self.factory, self.device, scratch / name, state)
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
