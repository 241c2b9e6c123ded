"""Tracking that notices when it is lost: the health figure per frame, lost within 2 frames of
a jump or an occlusion, back within 0.1 diameter within 3 frames of reappearance (from the
frame's mask when one is given, otherwise from the grown last good silhouette), no false
alarms on a smooth sequence, and the CLI's report.json and overlays say so."""
import json
import math

import pytest

from chunkpose import cli
from chunkpose.errors import InputError
from chunkpose.estimator import PoseEstimator
from chunkpose.metrics import add_error
from chunkpose.synth import Jump, Occlusion, make_scene

pytestmark = pytest.mark.gl
SMALL = dict(width=320, height=240, distractors=1, footprint=0.06)
HYPOTHESES = 84  # enough rotations for a registration after a 90 degree jump at this size


def run(scene, masks=False, **kw):
    """Register on frame 0 and track the rest: per frame (result, ADD / diameter)."""
    est = PoseEstimator(scene.mesh, budget_gb=None, device="cpu", hypotheses=HYPOTHESES, **kw)
    d = scene.mesh.diameter
    out = [est.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0])]
    for k in range(1, len(scene.rgb)):
        more = (scene.masks[k],) if masks else ()
        out.append(est.track(scene.rgb[k], scene.depth[k], scene.K, *more))
    return [(r, add_error(r.pose, gt, scene.mesh.vertices) / d) for r, gt in zip(out, scene.poses)]


def first(frames, predicate, start):
    return next((k for k in range(start, len(frames)) if predicate(frames[k])), None)


def recovered_from(frames, start):
    """The first frame >= start from which every frame is healthy and within 0.1 diameter."""
    return next((k for k in range(start, len(frames))
                 if all(not r.lost and err < 0.1 for r, err in frames[k:])), None)


@pytest.fixture(scope="module")
def smooth():
    return make_scene(frames=5, seed=3, **SMALL)


def test_smooth_tracking_stays_healthy(smooth):
    frames = run(smooth)
    assert all(r.health > 0.8 and not r.lost and not r.reregistered for r, _ in frames)
    assert all(err < 0.1 for _, err in frames)


def test_lost_behind_an_occluder_and_found_again_without_masks():
    scene = make_scene(frames=8, seed=5, events=[Occlusion(start=3, frames=2)], **SMALL)
    frames = run(scene)
    lost = first(frames, lambda f: f[0].lost, 1)
    assert lost is not None and 3 <= lost <= 4, [round(r.health, 2) for r, _ in frames]
    back = recovered_from(frames, 5)
    assert back is not None and back <= 5 + 2, [(round(r.health, 2), r.lost, round(e, 3)) for r, e in frames]


def test_lost_after_a_jump_and_reregistered_from_the_frames_mask():
    scene = make_scene(frames=7, seed=4, events=[Jump(frame=3)], **SMALL)
    frames = run(scene, masks=True)
    lost = first(frames, lambda f: f[0].lost, 1)
    assert lost is not None and 3 <= lost <= 4, [round(r.health, 2) for r, _ in frames]
    assert any(r.reregistered for r, _ in frames[3:])
    back = recovered_from(frames, 3)
    assert back is not None and back <= 3 + 2, [(round(r.health, 2), r.lost, round(e, 3)) for r, e in frames]


def test_leaving_the_view_is_lost_until_it_returns():
    scene = make_scene(frames=7, seed=6, events=[Occlusion(start=2, frames=2, by="out_of_view")], **SMALL)
    frames = run(scene)
    assert all(r.lost for r, _ in frames[2:4])
    back = recovered_from(frames, 4)
    assert back is not None and back <= 4 + 2


def test_health_checks_can_be_turned_off(smooth):
    frames = run(smooth, health_threshold=None)
    assert all(math.isnan(r.health) and not r.lost for r, _ in frames)


@pytest.mark.parametrize("kw", [dict(health_threshold=1.5), dict(health_tolerance=0), dict(search_margin=-1)])
def test_bad_health_settings_are_refused(smooth, kw):
    with pytest.raises(InputError):
        PoseEstimator(smooth.mesh, budget_gb=None, device="cpu", **kw)


def test_cli_reports_and_draws_lost_frames(tmp_path):
    scene = make_scene(frames=6, seed=5, events=[Occlusion(start=2, frames=2)], width=160, height=120,
                       distractors=1, footprint=0.08)
    folder = scene.save(tmp_path / "scene")
    out = tmp_path / "out"
    assert cli.main(["run", "--scene", str(folder), "--out", str(out)]) == 0
    frames = json.loads((out / "report.json").read_text())["frames"]
    assert all({"health", "lost", "reregistered"} <= set(f) for f in frames)
    assert not frames[0]["lost"] and any(f["lost"] for f in frames[2:4])
    assert (out / "vis" / f"{frames[2]['frame']}.png").is_file()
