"""A small synthetic BOP set shared by the BOP tests: four 160x120 images (mug = object 1
in images 0 and 1, duck = object 2 in images 2 and 3), written once with ground truth and
once as BOP publishes a test set (without). Targets: images 0, 1 (object 1) and 2
(object 2); image 3 is not one. Detections: image 0 right (and a duck no target asks
for), image 1 a wrong mask scored 0.8 and the right one scored 0.1, image 2 none, image 3
right; each carries the image's detection time, 0.2 s."""
import numpy as np

from chunkpose.io import bop
from chunkpose.io.bop_writer import BopGt, BopImage, write_bop_dataset

TARGETS = [bop.Target(1, 0, 1, 1), bop.Target(1, 1, 1, 1), bop.Target(1, 2, 2, 1)]
DETECTION_TIME_S = 0.2


def make_scenes():
    from chunkpose.synth import make_scene

    kwargs = dict(width=160, height=120, footprint=0.08, distractors=1)
    return [make_scene(mesh="mug", seed=1, **kwargs), make_scene(mesh="mug", seed=2, **kwargs),
            make_scene(mesh="duck", seed=3, **kwargs), make_scene(mesh="duck", seed=4, **kwargs)]


def wrong_mask(scenes):
    """Image 1's detection that misses the object (its mask shifted sideways)."""
    return np.roll(scenes[1].masks[0], 40, axis=1)


def write_sets(scenes, folder):
    """-> (gt_root, run_root, detections path) under ``folder``."""
    images = [BopImage(s.rgb[0], s.depth[0], s.K, [BopGt(o, s.poses[0], s.masks[0], s.full_masks[0])])
              for s, o in zip(scenes, [1, 1, 2, 2])]
    meshes = {1: scenes[0].mesh, 2: scenes[2].mesh}
    gt_root = write_bop_dataset(folder / "gt" / "ycbv", images, meshes)
    run_root = write_bop_dataset(folder / "run" / "ycbv", images, meshes, ground_truth=False)
    for root in (gt_root, run_root):
        bop.write_targets(root / "test_targets_bop19.json", TARGETS)
    t = DETECTION_TIME_S
    dets = [
        bop.detection_from_mask(1, 0, 1, 0.9, scenes[0].masks[0], time=t),
        bop.detection_from_mask(1, 0, 2, 0.95, scenes[0].masks[0], time=t),
        bop.detection_from_mask(1, 1, 1, 0.8, wrong_mask(scenes), time=t),
        bop.detection_from_mask(1, 1, 1, 0.1, scenes[1].masks[0], time=t),
        bop.detection_from_mask(1, 3, 2, 0.9, scenes[3].masks[0], time=t),
    ]
    return gt_root, run_root, bop.write_detections(folder / "detections.json.gz", dets)
