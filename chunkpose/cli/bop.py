"""``chunkpose run --bop DATASET``: register the instances of a BOP scene, write the BOP CSV."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from chunkpose.cli import calls, summary
from chunkpose.cli.debug import write_debug
from chunkpose.cli.parser import UserError
from chunkpose.cli.progress import progress


class _Objects:
    """The meshes and estimators of a BOP dataset's objects, made once each when first needed."""

    def __init__(self, args, reader, factory, device):
        self.args, self.reader, self.factory, self.device = args, reader, factory, device
        self.meshes, self.estimators = {}, {}

    def mesh(self, obj_id):
        if obj_id not in self.meshes:
            if self.args.mesh is not None:
                self.meshes[obj_id] = calls.load_mesh(self.args.mesh, self.args.mesh_scale)
            else:  # BOP models are in millimetres
                self.meshes[obj_id] = calls.load_mesh(self.reader.model_path(obj_id), self.args.mesh_scale or 0.001)
        return self.meshes[obj_id]

    def estimator(self, obj_id):
        if obj_id not in self.estimators:
            # the model's own symmetries (BOP models are in millimetres), unless --mesh replaces it
            symmetries = None
            if self.args.mesh is None:
                symmetries = self.reader.symmetry_transforms(obj_id, scale=self.args.mesh_scale or 0.001)
            more = {} if symmetries is None else {"symmetry_tfs": symmetries}
            self.estimators[obj_id] = calls.make_estimator(self.factory, self.mesh(obj_id), self.args, self.device, **more)
        return self.estimators[obj_id]


def _image(args, reader, objects, frame, instances, tmp, first: bool, written: list):
    """Register every instance of one image; every file written is appended to ``written``
    (so an interrupted image can be removed). Returns (records, csv rows)."""
    from chunkpose.io.results import bop_csv_row, write_pose_txt
    from chunkpose.vis import overlay, save_rgb

    records, overlays = [], []
    t_image = time.perf_counter()
    for inst in instances:
        mesh, est = objects.mesh(inst.obj_id), objects.estimator(inst.obj_id)
        result, elapsed = calls.timed(calls.register, est, (frame.rgb, frame.depth, frame.K, inst.mask),
                                      f"register {inst.name}")
        info = reader.model_info(inst.obj_id)
        record = calls.pose_record(inst.name, "register", result, elapsed, frame.extra.get("resize_factor", 1.0),
                                   inst.gt_pose, mesh, info.get("diameter"), info.get("symmetric", False),
                                   im_id=inst.im_id, gt_index=inst.gt_index, obj_id=inst.obj_id)
        path = tmp / "ob_in_cam" / f"{inst.name}.txt"
        written.append(path)
        write_pose_txt(path, record["pose"])
        if args.debug >= 3 or (args.debug >= 2 and first):
            written.append(tmp / "debug" / inst.name)
            write_debug(tmp, inst.name, frame, mesh, record["pose"], result, est, inst.mask)
        records.append(record)
        overlays.append((record["pose"], inst.gt_pose, calls.mesh_bounds(mesh)))
    # BOP: "time" is the time for the whole image, the same for all its estimates.
    image_time = time.perf_counter() - t_image
    rows = [bop_csv_row(args.scene_id, r["im_id"], r["obj_id"], r["score"] or 0.0, r["pose"], image_time)
            for r in records]
    if overlays:
        path = tmp / "vis" / f"{frame.name}.png"
        written.append(path)
        poses, gts, boxes = zip(*overlays)
        save_rgb(path, overlay(frame.rgb, list(poses), frame.K, list(boxes), gt_poses=list(gts), label=frame.name))
    return records, rows


def run_bop(args, estimator_factory) -> int:
    from chunkpose.io.readers import BOPReader
    from chunkpose.io.results import OutputDir, write_bop_csv

    if args.scene_id is None:
        raise UserError("--scene-id N is required with --bop (the scene folder number under the split)")
    reader = BOPReader(args.bop, split=args.split, scene_id=args.scene_id, downscale=args.downscale,
                       shorter_side=args.shorter_side, zfar=args.zfar)
    if not (reader.scene_dir / "mask_visib").is_dir():
        raise UserError(f"missing {reader.scene_dir / 'mask_visib'} (chunkpose registers annotated instances "
                        "from their visible masks; get the BOP scene with mask_visib/)")
    reader.frame(0)  # validates the first image before anything is written
    device = calls.resolve_device(args.device)
    objects = _Objects(args, reader, estimator_factory, device)
    wanted = set(args.obj_id or [])
    for gt in reader.scene_gt[str(reader.image_ids[0])]:  # a bad model fails before any output
        if not wanted or int(gt["obj_id"]) in wanted:
            objects.mesh(int(gt["obj_id"]))
    od = OutputDir(args.out)
    n = len(reader) if args.frames is None else min(args.frames, len(reader))
    state = calls.RunState()
    csv_rows, plan = [], None
    dataset = Path(args.bop).resolve().name
    csv_name = f"chunkpose_{dataset}-{args.split}.csv"
    with od as tmp:
        (tmp / "ob_in_cam").mkdir()
        (tmp / "vis").mkdir()
        written = []
        try:
            for i in progress(range(n), n, "images"):
                frame, instances = reader.frame(i)
                instances = [inst for inst in instances if not wanted or inst.obj_id in wanted]
                records, rows = _image(args, reader, objects, frame, instances, tmp, i == 0, written)
                if plan is None and records:
                    plan = records[0]["chunk_plan"]
                state.records += records
                csv_rows += rows
                written = []
        except KeyboardInterrupt:
            state.interrupted = True
            calls.remove(written)
        write_bop_csv(tmp / csv_name, csv_rows)
        report_head = summary.head(args, "run", device, layout="bop", dataset=str(Path(args.bop).resolve()),
                                   split=args.split, scene_id=args.scene_id, images_total=n, results_csv=csv_name,
                                   zfar=args.zfar, downscale=args.downscale, shorter_side=args.shorter_side)
        return summary.finish(args, od, tmp, "run", state, report_head,
                              f"chunkpose run: BOP {dataset} {args.split} scene {args.scene_id}", plan,
                              extra_json={"results_csv": str(Path(od.final) / csv_name)})
