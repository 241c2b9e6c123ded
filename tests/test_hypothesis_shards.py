"""One frame's hypotheses over several devices (PoseEstimator(devices=[...])): the pose and score
equal the one-device run's (same tolerance as chunked == unchunked), each device runs its own
shard under its own budget, and bad devices= arguments are refused clearly. CPU "devices" stand
in for GPUs here: the split, the gathering of scorer features and att_cross are the same code."""
import numpy as np
import pytest
import torch

from chunkpose.errors import InputError
from chunkpose.estimator import PoseEstimator

from test_estimator import HYPOTHESES, _estimator, _register, scene  # noqa: F401  (fixture)

pytestmark = pytest.mark.gl


def _learned_weights(tmp_path):
    from chunkpose.models.checkpoint import save_weights
    from chunkpose.models.refine_net import RefineNet
    from chunkpose.models.score_net import ScoreNetMultiPair

    torch.manual_seed(0)
    save_weights(tmp_path / "weights", RefineNet().eval(), ScoreNetMultiPair().eval())
    return tmp_path / "weights"


def test_geometric_pose_over_two_devices_equals_one_device(scene):  # noqa: F811
    one = _register(_estimator(scene), scene)
    split_est = _estimator(scene, devices=["cpu", "cpu"])
    two = _register(split_est, scene)
    assert np.allclose(two.pose, one.pose, atol=1e-5)
    assert two.score == pytest.approx(one.score, abs=1e-5)
    assert np.allclose(two.candidate_scores, one.candidate_scores, atol=1e-5)
    # the second device refined the second half of the hypotheses under its own engine
    (name, shard), = two.report.shards.items()
    assert name == "1:cpu" and shard is not two.report
    refined = shard.stages["refine.geometric"]
    assert refined.chunk_sizes == [HYPOTHESES - HYPOTHESES // 2] * refined.calls
    # the primary refined the first half (then polished its best few, which the shard does not)
    primary = two.report.stages["refine.geometric"].chunk_sizes
    assert primary[:refined.calls] == [HYPOTHESES // 2] * refined.calls
    assert "shards" in two.report.to_dict() and "shard on 1:cpu" in two.report.summary()
    # tracking runs on the primary, from the same pose
    (rgb, depth, _), _ = scene["frames"][1]
    assert np.allclose(split_est.track(rgb, depth, scene["K"]).pose,
                       _tracked_after_register(scene, rgb, depth), atol=1e-5)


def _tracked_after_register(scene, rgb, depth):
    est = _estimator(scene)
    _register(est, scene)
    return est.track(rgb, depth, scene["K"]).pose


def test_learned_pose_over_two_devices_equals_one_device_each_under_its_budget(scene, tmp_path):  # noqa: F811
    """The learned scorer's att_cross compares all hypotheses: it runs once on the gathered
    features, so scores match although each device only saw its own shard."""
    weights = _learned_weights(tmp_path)
    kw = dict(weights=weights, hypotheses=6, refine_iterations=1)
    one = _register(_estimator(scene, **kw), scene)
    two = _register(_estimator(scene, budget_gb=1.0, devices=["cpu", "cpu"], **kw), scene)
    assert np.allclose(two.pose, one.pose, atol=1e-5)
    assert np.allclose(two.candidate_scores, one.candidate_scores, atol=1e-4)
    shard = two.report.shards["1:cpu"]
    assert shard.budget_bytes == two.report.budget_bytes
    assert 0 < shard.total_peak_bytes <= shard.budget_bytes
    assert sum(shard.stages["score.learned.features"].chunk_sizes) == 3


@pytest.mark.parametrize("devices, device, match", [
    (["cpu"], None, "two or more"),
    ("cpu", None, "two or more"),
    (["cpu", "nonsense"], None, "devices"),
    (["cpu", "cpu"], "cuda:0", "primary"),
    (["cpu", "cuda:7"], None, "not available"),
])
def test_bad_devices_are_refused_clearly(scene, devices, device, match):  # noqa: F811
    with pytest.raises(InputError, match=match):
        PoseEstimator(scene["mesh"], budget_gb=None, device=device, devices=devices, hypotheses=HYPOTHESES)


def test_a_custom_renderer_is_not_replicated_silently(scene):  # noqa: F811
    from chunkpose.ops.render import make_renderer

    renderer = make_renderer(scene["mesh"].centered(), "cpu")
    with pytest.raises(InputError, match="renderer"):
        PoseEstimator(scene["mesh"], budget_gb=None, devices=["cpu", "cpu"], renderer=renderer)
