"""``chunkpose run --bop DATASET``: register the targets of BOP images, write BOP's results CSV.

Where the masks come from: with ``--detections FILE`` (BOP's default detections or any
COCO-style segmentation JSON) each target is registered from its detection's mask, the
best ``inst_count`` detections per target object as BOP19 asks, and the image's detection
time is added to its pose time. Without detections the split's ground-truth visible masks
are used (mask_visib/; a check with perfect masks, impossible on a BOP test set, where the
ground truth is withheld). Which images and how many instances: the targets file
(``--targets``, default the dataset's test_targets_bop19.json); without one, every image
of the scene(s) and every annotated instance (or every detected object once).

The work is a list of images (``<scene:06d>_<im:06d>``), each registered whole and its
files written to a scratch folder that is moved into the output only when the image is
done, so an interrupted run keeps finished images only. Under torchrun the images are the
units the ranks claim (chunkpose.cli.ranks); the merged folder is the one a single
process writes.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from chunkpose.cli import calls, summary
from chunkpose.cli.debug import write_debug
from chunkpose.cli.parser import UserError
from chunkpose.cli.progress import progress


@dataclass(frozen=True)
class ImageUnit:
    """One BOP image to process: its scene, image id and position in the scene reader."""

    scene_id: int
    im_id: int

    @property
    def name(self) -> str:
        return f"{self.scene_id:06d}_{self.im_id:06d}"


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
            from chunkpose.estimator import PoseEstimator
            from chunkpose.multi_object import share_one_budget

            # the model's own symmetries (BOP models are in millimetres), unless --mesh replaces it
            symmetries = None
            if self.args.mesh is None:
                symmetries = self.reader.symmetry_transforms(obj_id, scale=self.args.mesh_scale or 0.001)
            more = {} if symmetries is None else {"symmetry_tfs": symmetries}
            first = next(iter(self.estimators.values()), None)
            shared = isinstance(first, PoseEstimator)
            if shared:  # one copy of the networks for all objects
                more.update(refiner=first.refiner, scorer=first.scorer)
            self.estimators[obj_id] = calls.make_estimator(self.factory, self.mesh(obj_id), self.args, self.device, **more)
            if shared or (first is None and isinstance(self.estimators[obj_id], PoseEstimator)):
                # every object of an image under one budget, cost models calibrated once
                share_one_budget(list(self.estimators.values()))
        return self.estimators[obj_id]

    def register_all(self, frame, instances, label: str) -> list:
        """Every instance of one image registered in one engine call (all objects' hypotheses
        planned together, the image cleaned once), or one by one with estimators that are not
        PoseEstimators."""
        from chunkpose.estimator import PoseEstimator
        from chunkpose.multi_object import register_together

        estimators = [self.estimator(inst.obj_id) for inst in instances]
        if not estimators:
            return []
        if not all(isinstance(est, PoseEstimator) for est in estimators):
            return [calls.register(est, (frame.rgb, frame.depth, frame.K, inst.mask), f"register {label}")
                    for est, inst in zip(estimators, instances)]
        names = [f"{label}_{inst.gt_index:06d}" for inst in instances]
        with calls.StageBar(estimators[0], f"register {label} ({len(instances)} instances)"):
            return register_together(estimators, frame.rgb, frame.depth, frame.K, [i.mask for i in instances], names)


def _largest_per_target(instances, objects: dict):
    """The ``objects[obj_id]`` most visible annotated instances of each target object: by
    scene_gt_info's visib_fract, as BOP19 picks the instances an estimate can match (by
    visible pixels where the scene has no gt_info)."""
    chosen = []
    for obj_id, count in objects.items():
        same = [i for i in instances if i.obj_id == obj_id]
        by_fraction = all(i.visib_fract is not None for i in same)
        same.sort(key=lambda i: -(i.visib_fract if by_fraction else int(i.mask.sum())))
        chosen += same[:count]
    return chosen


class BopRun:
    """What a ``run --bop`` needs before its first image: the dataset's scenes, targets,
    detections and object models, all checked so that bad input fails before any output."""

    def __init__(self, args, factory, device=None):
        from chunkpose.io import bop
        from chunkpose.io.bop_results import results_filename, split_folder

        self.args = args
        self.split = split_folder(args.bop, args.split)
        # the name is checked first: a method bop_toolkit cannot parse is refused, not renamed
        self.csv_name = results_filename(args.method, args.bop, self.split.split, self.split.split_type)
        self.targets_path = args.targets if args.targets is not None else bop.default_targets_path(args.bop)
        self.targets = bop.read_targets(self.targets_path) if self.targets_path is not None else None
        self.detections = bop.read_detections(args.detections) if args.detections is not None else None
        self.scene_ids = self._scene_ids()
        self.readers = {s: self._reader(s) for s in self.scene_ids}
        self.wanted = set(args.obj_id or [])
        self.units = self._units()
        if not self.units:
            raise UserError(f"no target images in scene(s) {self.scene_ids} of {args.bop} (check --scene-id, --targets)")
        first = self.readers[self.scene_ids[0]]
        first.image(0)  # validates the first image before anything is written
        self.device = calls.resolve_device(args.device) if device is None else str(device)
        self.objects = _Objects(args, first, factory, self.device)
        for obj_id in sorted(self._object_ids()):  # a bad model fails before any output
            self.objects.mesh(obj_id)

    # -------------------------------------------------------------- set-up
    def _scene_ids(self) -> list[int]:
        from chunkpose.io.bop_results import bop_scene_ids

        if self.args.scene_id is not None:
            return [int(self.args.scene_id)]
        if self.targets is not None:
            return sorted({t.scene_id for t in self.targets})
        scene_ids = bop_scene_ids(self.args.bop, self.split.folder)
        if not scene_ids:
            raise UserError(f"no scene folders in {Path(self.args.bop) / self.split.folder} "
                            "(check --bop and --split)")
        return scene_ids

    def _reader(self, scene_id: int):
        from chunkpose.io.bop_reader import BOPReader

        args = self.args
        reader = BOPReader(args.bop, split=self.split.folder, scene_id=scene_id, downscale=args.downscale,
                           shorter_side=args.shorter_side, zfar=args.zfar)
        if self.detections is None:
            if not reader.has_ground_truth():
                raise UserError(f"{reader.scene_dir} has no scene_gt.json (a BOP test set): pass the detections "
                                "with --detections FILE (e.g. BOP's default detections)")
            if not (reader.scene_dir / "mask_visib").is_dir():
                raise UserError(f"missing {reader.scene_dir / 'mask_visib'}: without --detections chunkpose "
                                "registers annotated instances from their visible masks")
        return reader

    def _image_targets(self, scene_id: int) -> dict[int, dict[int, int]] | None:
        """{im_id: {obj_id: inst_count}} of the scene, or None without a targets file."""
        from chunkpose.io.bop import targets_by_image

        if self.targets is None:
            return None
        return {im: objs for (s, im), objs in targets_by_image(self.targets).items() if s == scene_id}

    def _units(self) -> list[ImageUnit]:
        units = []
        for scene_id in self.scene_ids:
            reader = self.readers[scene_id]
            targets = self._image_targets(scene_id)
            im_ids = reader.image_ids if targets is None else sorted(targets)
            for im_id in im_ids:
                reader.index_of(im_id)  # a target image the scene does not have is an error now
                units.append(ImageUnit(scene_id, im_id))
        if self.args.frames is not None:
            units = units[: self.args.frames]
        return units

    def _object_ids(self) -> set[int]:
        if self.targets is not None:
            ids = {t.obj_id for t in self.targets if t.scene_id in self.readers}
        elif self.detections is not None:
            ids = {d.obj_id for key, dets in self.detections.items() if key[0] in self.readers for d in dets}
        else:
            ids = {int(gt["obj_id"]) for r in self.readers.values() for gts in r.scene_gt.values() for gt in gts}
        return {i for i in ids if not self.wanted or i in self.wanted}

    # -------------------------------------------------------------- one image
    def instances(self, unit: ImageUnit):
        """(frame, instances to register, detection seconds or None) of one image."""
        from chunkpose.io import bop

        reader = self.readers[unit.scene_id]
        index = reader.index_of(unit.im_id)
        targets = self._image_targets(unit.scene_id)
        objects = None if targets is None else targets.get(unit.im_id, {})
        detection_time = None
        if self.detections is not None:
            frame = reader.image(index)
            image_dets = self.detections.get((unit.scene_id, unit.im_id), [])
            if objects is None:  # each detected object once, its best detection
                objects = {d.obj_id: 1 for d in image_dets}
            chosen = bop.select_detections({(unit.scene_id, unit.im_id): image_dets},
                                           [bop.Target(unit.scene_id, unit.im_id, o, n) for o, n in objects.items()])
            instances = reader.detection_instances(frame, chosen[(unit.scene_id, unit.im_id)])
            detection_time = bop.image_detection_time(image_dets)
        else:
            frame, instances = reader.frame(index)
            if objects is not None:
                instances = _largest_per_target(instances, objects)
        instances = [i for i in instances if not self.wanted or i.obj_id in self.wanted]
        return frame, instances, detection_time

    def process(self, unit: ImageUnit, scratch: Path, first: bool) -> dict:
        """Register every instance of one image into ``scratch``; returns its report records
        and its rows of the results CSV."""
        from chunkpose.io.results import bop_csv_row, write_pose_txt
        from chunkpose.vis import overlay, save_rgb

        frame, instances, detection_time = self.instances(unit)
        reader = self.readers[unit.scene_id]
        records, overlays = [], []
        results, elapsed = calls.timed(self.objects.register_all, frame, instances, unit.name)
        for inst, result in zip(instances, results):
            name = f"{unit.name}_{inst.gt_index:06d}"
            mesh, est = self.objects.mesh(inst.obj_id), self.objects.estimator(inst.obj_id)
            info = reader.model_info(inst.obj_id)
            record = calls.pose_record(name, "register", result, elapsed, frame.extra.get("resize_factor", 1.0),
                                       inst.gt_pose, mesh, info.get("diameter"), info.get("symmetric", False),
                                       scene_id=unit.scene_id, im_id=unit.im_id, gt_index=inst.gt_index,
                                       obj_id=inst.obj_id, detection_score=inst.score)
            write_pose_txt(scratch / "ob_in_cam" / f"{name}.txt", record["pose"])
            if self.args.debug >= 3 or (self.args.debug >= 2 and first):
                write_debug(scratch, name, frame, mesh, record["pose"], result, est, inst.mask)
            records.append(record)
            overlays.append((record["pose"], inst.gt_pose, calls.mesh_bounds(mesh)))
        # BOP: "time" runs from the loaded image to its poses (not the file writing), detection
        # included, the same for all the image's estimates
        image_time = elapsed + (detection_time or 0.0)
        rows = [bop_csv_row(unit.scene_id, unit.im_id, r["obj_id"], r["score"] or 0.0, r["pose"], image_time)
                for r in records]
        if overlays:
            poses, gts, boxes = zip(*overlays)
            save_rgb(scratch / "vis" / f"{unit.name}.png",
                     overlay(frame.rgb, list(poses), frame.K, list(boxes), gt_poses=list(gts), label=unit.name))
        return {"records": records, "rows": rows, "detection_time_s": detection_time}

    def report_fields(self) -> dict:
        return {"layout": "bop", "dataset": str(Path(self.args.bop).resolve()), "split": self.split.folder,
                "scene_ids": self.scene_ids, "images_total": len(self.units), "results_csv": self.csv_name,
                "method": self.args.method, "masks": "detections" if self.detections is not None else "mask_visib",
                "detections": None if self.args.detections is None else str(Path(self.args.detections).resolve()),
                "targets": None if self.targets_path is None else str(Path(self.targets_path).resolve()),
                "zfar": self.args.zfar, "downscale": self.args.downscale, "shorter_side": self.args.shorter_side}


def _move_into(scratch: Path, tmp: Path) -> None:
    """Move a finished image's files from its scratch folder into the output folder."""
    for path in sorted(p for p in scratch.rglob("*") if p.is_file()):
        target = tmp / path.relative_to(scratch)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
    shutil.rmtree(scratch, ignore_errors=True)


def run_bop(args, estimator_factory) -> int:
    from chunkpose.cli.ranks import rank_context

    ctx = rank_context(args)
    if ctx is not None:
        return _run_bop_on_ranks(args, estimator_factory, ctx)
    return _run_bop_here(args, estimator_factory)


def _title(run: BopRun) -> str:
    scenes = ", ".join(str(s) for s in run.scene_ids)
    return f"chunkpose run: BOP {Path(run.args.bop).resolve().name} {run.split.folder} scene {scenes}"


def _run_bop_here(args, estimator_factory) -> int:
    from chunkpose.io.results import OutputDir, write_bop_csv

    run = BopRun(args, estimator_factory)
    od = OutputDir(args.out)
    state = calls.RunState()
    csv_rows, plan = [], None
    with od as tmp:
        (tmp / "ob_in_cam").mkdir()
        (tmp / "vis").mkdir()
        scratch = tmp / ".image"
        try:
            for k, unit in enumerate(progress(run.units, len(run.units), "images")):
                shutil.rmtree(scratch, ignore_errors=True)
                (scratch / "ob_in_cam").mkdir(parents=True)
                (scratch / "vis").mkdir()
                done = run.process(unit, scratch, k == 0)
                _move_into(scratch, tmp)
                if plan is None and done["records"]:
                    plan = done["records"][0]["chunk_plan"]
                state.records += done["records"]
                csv_rows += done["rows"]
        except KeyboardInterrupt:
            state.interrupted = True
        shutil.rmtree(scratch, ignore_errors=True)
        write_bop_csv(tmp / run.csv_name, csv_rows)
        report_head = summary.head(args, "run", run.device, **run.report_fields())
        return summary.finish(args, od, tmp, "run", state, report_head, _title(run), plan,
                              extra_json={"results_csv": str(Path(od.final) / run.csv_name)})


def _run_bop_on_ranks(args, estimator_factory, ctx) -> int:
    """Every rank registers whole images it claims, under its own budget on its own device."""
    from chunkpose.cli.ranks import UnitWork, run_on_ranks
    from chunkpose.io.results import write_bop_csv

    run = BopRun(args, estimator_factory, device=ctx.device)
    units = {unit.name: unit for unit in run.units}
    first = run.units[0].name

    def process(name, scratch):
        (scratch / "ob_in_cam").mkdir(parents=True, exist_ok=True)
        (scratch / "vis").mkdir(exist_ok=True)
        return run.process(units[name], scratch, name == first)

    def write_outputs(folder, results):
        write_bop_csv(folder / run.csv_name, [row for result in results for row in result["rows"]])

    head = summary.head(args, "run", str(ctx.device), **run.report_fields())
    return run_on_ranks(args, ctx, UnitWork(list(units), process, write_outputs, head, _title(run)))
