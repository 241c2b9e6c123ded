"""The weight-free registration + tracking under conditions the pipeline was not tuned on:
meshes of other shapes (trimesh primitives, a random convex hull, a mesh in millimetres),
other resolutions and odd image sizes, skewed intrinsics, objects cut off by the image
border, masks with holes and depth with missing pixels, small objects at low resolution.

Each case makes a synthetic scene (chunkpose.synth), registers on frame 0 and tracks frame
1, and asserts: translation error < 0.1 x diameter, ADD-S < 0.1 x diameter, and for
meshes without a symmetry also ADD < 0.1 x diameter (ADD is undefined up to the symmetry
for a cylinder, capsule or annulus). Fast cases run at small resolutions with 84
hypotheses (a spread subset of the 252); the slow one runs 252 at 2048x1536.
"""
import numpy as np
import pytest
import trimesh

from chunkpose.io.mesh import load_mesh
from chunkpose.metrics import add_error, adds_error

synth = pytest.importorskip("chunkpose.synth")
pytestmark = pytest.mark.gl

TOLERANCE = 0.1  # x diameter


def _coloured(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A primitive with a smooth colour gradient (the geometric pipeline ignores colour;
    it only makes the pictures readable)."""
    v = np.asarray(mesh.vertices)
    t = (v - v.min(0)) / np.ptp(v, axis=0).clip(1e-9)
    rgba = np.concatenate([0.3 + 0.6 * t, np.ones((len(v), 1))], axis=1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=(rgba * 255).astype(np.uint8))
    return mesh


def _hull(seed=7):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(24, 3)) * np.array([0.06, 0.035, 0.025])
    return _coloured(trimesh.convex.convex_hull(points))


def _millimetres(tmp_path):
    """A builtin object written in millimetres, loaded back with scale=0.001."""
    from chunkpose.shapes import builtin_meshes

    mesh = builtin_meshes()["blocks"]
    mesh.apply_scale(1000.0)
    path = tmp_path / "blocks_mm.ply"
    mesh.export(path)
    with pytest.raises(ValueError, match="millimetres"):
        load_mesh(path)
    return load_mesh(path, scale=0.001)


MESHES = {
    # name: (factory(tmp_path), symmetric)
    "cylinder": (lambda _: _coloured(trimesh.creation.cylinder(radius=0.035, height=0.12, sections=48)), True),
    "capsule": (lambda _: _coloured(trimesh.creation.capsule(height=0.09, radius=0.03, count=[24, 24])), True),
    "annulus": (lambda _: _coloured(trimesh.creation.annulus(r_min=0.03, r_max=0.05, height=0.03, sections=48)), True),
    "convex_hull": (lambda _: _hull(), False),
    "millimetres": (_millimetres, False),
    "drill": (lambda _: "drill", False),
    "duck": (lambda _: "duck", False),
    "blocks": (lambda _: "blocks", False),
}


def _skewed_K(width, height):
    """fx != fy and a principal point far from the image centre."""
    return np.array([[0.9 * width, 0.0, 0.42 * width], [0.0, 0.78 * width, 0.58 * height], [0.0, 0.0, 1.0]])


def _holes_and_dropouts(scene, seed=0):
    """Punch holes in the first mask (a few discs and 10% random pixels) and drop 25% of
    the depth pixels everywhere, in place."""
    rng = np.random.default_rng(seed)
    H, W = scene.masks[0].shape
    ys, xs = np.nonzero(scene.masks[0])
    radius = max(2, int(0.08 * np.sqrt(len(xs))))
    yy, xx = np.mgrid[0:H, 0:W]
    mask = scene.masks[0].copy()
    for i in rng.choice(len(xs), size=3, replace=False):
        mask &= (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 > radius**2
    mask &= rng.uniform(size=mask.shape) > 0.1
    scene.masks[0] = mask
    for depth in scene.depth:
        depth[rng.uniform(size=depth.shape) < 0.25] = 0.0


def _run_case(mesh, symmetric, width, height, *, seed=0, footprint=0.06, K=None, outside=0.0, damage=False,
              hypotheses=84, track=True):
    from chunkpose import PoseEstimator

    scene = synth.make_scene(mesh=mesh, width=width, height=height, frames=2 if track else 1, footprint=footprint,
                             seed=seed, K=K, outside=outside)
    if damage:
        _holes_and_dropouts(scene, seed)
    est = PoseEstimator(scene.mesh, budget_gb=0.5, device="cpu", hypotheses=hypotheses)
    results = [est.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0])]
    if track:
        results.append(est.track(scene.rgb[1], scene.depth[1], scene.K))
    d = scene.mesh.diameter
    points = scene.mesh.vertices
    rows = []
    for res, gt in zip(results, scene.poses):
        assert res.report.peak_bytes <= res.report.budget_bytes
        rows.append(dict(trans=float(np.linalg.norm(res.pose[:3, 3] - gt[:3, 3]) / d),
                         add=add_error(res.pose, gt, points) / d, add_s=adds_error(res.pose, gt, points) / d))
    print(f"\n{scene!r}: " + "; ".join(f"trans {r['trans']:.3f} d, ADD {r['add']:.3f} d, ADD-S {r['add_s']:.3f} d"
                                        for r in rows))
    # A builtin drawn by the seed: the mug is symmetric once its handle hides, and then
    # where its bounding-box centre is (the handle widens the box) is not defined either.
    handle_may_hide = scene.info["object"] == "mug"
    symmetric = handle_may_hide if symmetric is None else symmetric
    for stage, r in zip(("register", "track"), rows):
        if not handle_may_hide:
            assert r["trans"] < TOLERANCE, (stage, r)
        assert r["add_s"] < TOLERANCE, (stage, r)
        if not symmetric:
            assert r["add"] < TOLERANCE, (stage, r)
    return scene, rows


# (mesh, width, height, condition, seed): every mesh once, every condition at least once
# (two run in the default suite, the rest with -m slow: each registration is seconds on a
# quiet CPU but the suite has to stay short)
_SLOW = pytest.mark.slow
CASES = [
    pytest.param("cylinder", 640, 480, "holes", 1, marks=_SLOW, id="cylinder-640x480-holes"),
    pytest.param("capsule", 1280, 720, None, 2, marks=_SLOW, id="capsule-1280x720"),
    pytest.param("annulus", 1001, 777, "skewed_K", 3, marks=_SLOW, id="annulus-1001x777-skewed_K"),
    pytest.param("convex_hull", 640, 480, "skewed_K", 4, id="convex_hull-640x480-skewed_K"),
    pytest.param("millimetres", 333, 251, None, 5, marks=_SLOW, id="millimetres-333x251"),
    pytest.param("drill", 640, 480, "cut_off", 6, marks=_SLOW, id="drill-640x480-cut_off"),
    pytest.param("duck", 800, 600, "cut_off", 7, id="duck-800x600-cut_off"),
]


@pytest.mark.parametrize("name,width,height,condition,seed", CASES)
def test_unseen_meshes_sizes_and_conditions(name, width, height, condition, seed, tmp_path):
    factory, symmetric = MESHES[name]
    kwargs = dict(seed=seed, footprint=0.06)
    if condition == "skewed_K":
        kwargs["K"] = _skewed_K(width, height)
    elif condition == "cut_off":
        kwargs.update(outside=0.3, footprint=0.08)
    scene, _ = _run_case(factory(tmp_path), symmetric, width, height, damage=condition == "holes", **kwargs)
    if condition == "cut_off":
        m = scene.masks[0]
        assert m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()  # really cut off


@pytest.mark.parametrize("seed", [pytest.param(0, marks=_SLOW), 2])
def test_small_objects_at_low_resolution(seed):
    """CI once saw 3 cm translation errors here: a mug/drill covering ~3.7% of 320x240."""
    _run_case(None, None, 320, 240, seed=seed, footprint=0.037)


def test_too_few_depth_pixels_is_a_clear_error():
    """An object whose mask has almost no valid depth: a clear ValueError, not a wild pose."""
    from chunkpose import PoseEstimator

    scene = synth.make_scene(mesh="duck", width=320, height=240, footprint=0.05, seed=9)
    depth = scene.depth[0].copy()
    mask = scene.masks[0]
    keep = np.flatnonzero(mask.ravel())[:2]
    depth[mask] = 0.0
    depth.ravel()[keep] = scene.depth_clean[0].ravel()[keep]
    est = PoseEstimator(scene.mesh, budget_gb=0.5, device="cpu", hypotheses=12)
    with pytest.raises(ValueError, match="depth"):
        est.register(scene.rgb[0], depth, scene.K, mask)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convex_hull", "drill"])
def test_full_hypotheses_at_2048x1536(name, tmp_path):
    factory, symmetric = MESHES[name]
    _run_case(factory(tmp_path), symmetric, 2048, 1536, seed=11, footprint=0.04, K=_skewed_K(2048, 1536),
              hypotheses=252)
