"""Synthetic RGB-D scenes with ground truth, at any resolution (default 3072x2048).

One object (or up to four, ``objects=``) at random poses in front of a textured, tilted
background plane, with distractor objects that never hide most of them; a depth sensor
model (noise growing with z^2, 1 mm quantisation, missing pixels at depth edges), RGB
noise, and per object the visible mask, the full silhouette and the ground-truth pose.
``footprint`` sets the fraction of the image an object covers (by choosing its distance);
``frames > 1`` gives a smooth motion sequence for tracking, and ``events=`` adds abrupt
jumps and full occlusions with reappearance (tagged per frame). Everything is drawn from
``numpy.random.default_rng(seed)``: the same seed gives the same scene.

    scene = make_scene(mesh=None, width=3072, height=2048, frames=1, footprint=None, seed=0)
    scene = make_scene(objects=["mug", "drill", "duck"], frames=10,
                       events=[Jump(frame=4), Occlusion(start=6, frames=2, obj="duck")])
    scene.objects[2].masks, scene.objects[2].events, scene.event_frames("jump")
    scene.save("out/scene", layout="ycbineoat")   # or layout="bop"

Modules: builder (make_scene), placement (camera, objects' distances and motion),
separation (the rule keeping objects apart), backdrop (plane, distractors and their rules),
events (Jump, Occlusion), imaging (compositing, sensor model), scene (Scene, ObjectTrack,
saving).
"""
from chunkpose.shapes import builtin_meshes

from .backdrop import MAX_OCCLUSION_OVERLAP
from .builder import DEFAULT_FOOTPRINT, FOOTPRINT_RANGE, MAX_OBJECTS, make_scene
from .events import JUMP, OCCLUDED, REAPPEARED, Jump, Occlusion
from .imaging import DEPTH_NOISE_A, DEPTH_NOISE_B, LIGHT, RGB_NOISE_SIGMA, sensor_depth
from .scene import ObjectTrack, Scene
from .separation import MAX_OBJECT_OVERLAP

__all__ = [
    "DEFAULT_FOOTPRINT", "DEPTH_NOISE_A", "DEPTH_NOISE_B", "FOOTPRINT_RANGE", "JUMP", "Jump", "LIGHT",
    "MAX_OBJECTS", "MAX_OBJECT_OVERLAP", "MAX_OCCLUSION_OVERLAP", "OCCLUDED", "ObjectTrack", "Occlusion",
    "REAPPEARED", "RGB_NOISE_SIGMA", "Scene", "builtin_meshes", "make_scene", "sensor_depth",
]
