"""``chunkpose run --scene DIR`` on a scene with several objects (masks/<name>/ folders or a
labels/ image per frame): one MultiObjectEstimator under one budget; outputs
ob_in_cam/<name>/<frame>.txt, one overlay per frame with every object, and report.json
records that carry "object"."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from chunkpose.cli import calls
from chunkpose.cli.parser import UserError
from chunkpose.cli.progress import progress


def scene_objects(args, scene_dir) -> dict | None:
    """{name: (Mesh, path)} of the objects to run on a scene with per-object masks, or None for a
    one-object scene. From --mesh NAME=FILE (those objects only), else the scene's mesh/<name>.*."""
    from chunkpose.io.readers import object_names, scene_meshes

    names = object_names(scene_dir)
    given = dict(getattr(args, "object_meshes", None) or {})
    if not names:
        if given:
            raise UserError(f"--mesh NAME=FILE names objects, but {scene_dir} has no masks/<name>/ folders or "
                            "labels/ with labels.json; give one --mesh FILE for a one-object scene")
        return None
    if args.mesh is not None:
        raise UserError(f"{scene_dir} has {len(names)} objects ({', '.join(names)}); name each mesh with "
                        "--mesh NAME=FILE (or leave --mesh out to use the scene's mesh/ folder)")
    if given:
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise UserError(f"--mesh {unknown[0]}=...: {scene_dir} has no masks for {', '.join(unknown)} "
                            f"(its objects: {', '.join(names)})")
        chosen = {name: given[name] for name in names if name in given}
    else:
        meshes = scene_meshes(scene_dir)
        missing = [name for name in names if name not in meshes]
        if missing:
            raise UserError(f"no mesh for {', '.join(missing)} in {Path(scene_dir) / 'mesh'}; pass "
                            + " ".join(f"--mesh {name}=FILE" for name in missing))
        chosen = {name: meshes[name] for name in names}
    return {name: (calls.load_mesh(path, args.mesh_scale), Path(path)) for name, path in chosen.items()}


def frame_masks(scene_dir, frame) -> dict:
    """{name: (H,W) bool} of a frame, at the size the reader resized the frame to."""
    from chunkpose.io.readers import object_masks

    H, W = frame.depth.shape
    out = {}
    for name, mask in object_masks(scene_dir, frame.name).items():
        if mask.shape != (H, W):
            mask = cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) > 0
        out[name] = mask
    return out


def first_masks(scene_dir, frame, objects) -> dict:
    """The first frame's non-empty masks of the objects to run; an error when there is none."""
    masks = {name: m for name, m in frame_masks(scene_dir, frame).items() if name in objects and m.any()}
    if not masks:
        raise UserError(f"frame {frame.name} of {scene_dir} has no non-empty mask of {', '.join(objects)}; "
                        "the first frame needs the mask of at least one object")
    return masks


def multi_estimator(args, objects, device):
    from chunkpose.multi_object import MultiObjectEstimator

    return calls.make_estimator(MultiObjectEstimator, {name: mesh for name, (mesh, _) in objects.items()}, args,
                                device)


def register_and_track_objects(args, est, reader, n, objects, scene_dir, tmp, state) -> dict | None:
    """Every frame: register the objects with a first mask, track the registered ones; write
    ob_in_cam/<name>/, vis/ and one record per object and frame. Returns the first frame's plan."""
    from chunkpose.io.readers import object_poses
    from chunkpose.io.results import write_pose_txt
    from chunkpose.vis import save_rgb

    for name in objects:
        (tmp / "ob_in_cam" / name).mkdir(parents=True)
    (tmp / "vis").mkdir()
    plan, written = None, []
    try:
        for i in progress(range(n), n, "frames"):
            frame = reader.frame(i)
            masks = first_masks(scene_dir, frame, objects) if i == 0 else frame_masks(scene_dir, frame)
            call = est.register if i == 0 else est.track
            results, elapsed = calls.timed(call, frame.rgb, frame.depth, frame.K, masks)
            gts = object_poses(scene_dir, frame.name)
            records = [calls.pose_record(frame.name, "register" if result.candidates.size else "track", result,
                                         elapsed, frame.extra.get("resize_factor", 1.0), gts.get(name),
                                         objects[name][0], object=name)
                       for name, result in results.items()]
            written = [tmp / "ob_in_cam" / r["object"] / f"{frame.name}.txt" for r in records]
            for path, record in zip(written, records):
                write_pose_txt(path, record["pose"])
            written.append(tmp / "vis" / f"{frame.name}.png")
            save_rgb(written[-1], _overlay(frame, records, objects, gts))
            plan = plan or calls.chunk_plan(est.last_report.to_dict())
            state.records.extend(records)
            written = []
    except KeyboardInterrupt:
        state.interrupted = True
        calls.remove(written)
    return plan


def _overlay(frame, records, objects, gts):
    from chunkpose.vis import overlay_objects

    items = [(r["pose"], calls.mesh_bounds(objects[r["object"]][0]), gts.get(r["object"]),
              bool(r.get("lost") and not r.get("reregistered"))) for r in records]
    lost = [r["object"] for r, item in zip(records, items) if item[3]]
    return overlay_objects(frame.rgb, frame.K, items, frame.name + (f"  lost: {', '.join(lost)}" if lost else ""))
