"""Checkpoints in FoundationPose's layout: write random weights, load them back, clear errors."""
import shutil

import pytest
import torch
import yaml

from chunkpose.models import CheckpointError, RefineNet, ScoreNetMultiPair, load_weights, save_weights
from chunkpose.models.checkpoint import REFINER_RUN, SCORER_RUN, find_run_folders, load_network


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(1)
    refiner, scorer = RefineNet(), ScoreNetMultiPair()
    with torch.no_grad():  # non-default BatchNorm statistics must survive the round trip
        refiner.encodeA[0].net[1].running_mean.uniform_()
        scorer.encoderAB[3].bn2.running_var.uniform_(0.5, 2.0)
    return refiner, scorer


@pytest.fixture(scope="module")
def weights_dir(nets, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp") / "weights"
    refiner_cfg = {"c_in": 6, "crop_ratio": 1.25, "rot_normalizer": 0.3, "input_resize": [160, 160],
                   "normalize_xyz": True, "rot_rep": "axis_angle", "trans_rep": "tracknet", "use_BN": True,
                   "exp_name": "refine_run"}
    save_weights(root, *nets, refiner_config=refiner_cfg)
    return root


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_upstream_layout_round_trip(nets, weights_dir):
    assert (weights_dir / REFINER_RUN / "model_best.pth").is_file()
    assert (weights_dir / SCORER_RUN / "config.yml").is_file()
    raw = torch.load(weights_dir / REFINER_RUN / "model_best.pth", weights_only=True)
    assert set(raw) == {"model"} and "encodeA.0.net.0.weight" in raw["model"]
    refiner, scorer, configs = load_weights(weights_dir)
    assert_same_weights(refiner, nets[0])
    assert_same_weights(scorer, nets[1])
    assert not refiner.training and not scorer.training
    # the config drives the behaviour; missing keys take the official defaults
    assert configs["refiner"]["crop_ratio"] == 1.25 and configs["refiner"]["rot_normalizer"] == 0.3
    assert configs["scorer"]["crop_ratio"] == 1.1 and configs["scorer"].crop_size == 160
    # the parent of `weights/`, a run folder or its model_best.pth work too
    for path in (weights_dir.parent, weights_dir / SCORER_RUN, weights_dir / REFINER_RUN / "model_best.pth"):
        assert find_run_folders(path) == {"refiner": weights_dir / REFINER_RUN, "scorer": weights_dir / SCORER_RUN}
    r2, _, _ = load_weights(weights_dir.parent)
    assert_same_weights(r2, nets[0])


def test_learned_pair_from_weights_uses_config(weights_dir):
    from chunkpose.pipeline.learned import LearnedRefiner, LearnedScorer, load_learned

    refiner, scorer = load_learned(weights_dir)
    assert isinstance(refiner, LearnedRefiner) and isinstance(scorer, LearnedScorer)
    assert refiner.crop_ratio == 1.25 and refiner.rot_normalizer == 0.3 and refiner.crop_size == 160
    assert scorer.crop_ratio == 1.1


def test_any_folder_names_plain_state_dict_and_module_prefix(nets, weights_dir, tmp_path):
    # runs under other names; the scorer as a plain state dict saved from DataParallel
    shutil.copytree(weights_dir / REFINER_RUN, tmp_path / "a_run")
    (tmp_path / "b_run").mkdir()
    state = {"module." + k: v for k, v in nets[1].state_dict().items()}
    torch.save(state, tmp_path / "b_run" / "model_best.pth")
    (tmp_path / "notes").mkdir()  # unrelated folders are ignored
    runs = find_run_folders(tmp_path)
    assert runs == {"refiner": tmp_path / "a_run", "scorer": tmp_path / "b_run"}
    refiner, scorer, configs = load_weights(tmp_path)
    assert_same_weights(scorer, nets[1])
    assert configs["scorer"].raw == {}  # no config.yml: defaults


def test_wrong_keys_give_a_clear_error(nets, weights_dir, tmp_path):
    shutil.copytree(weights_dir, tmp_path / "w")
    path = tmp_path / "w" / REFINER_RUN / "model_best.pth"
    state = dict(nets[0].state_dict())
    state.pop("trans_head.1.weight")
    state["extra_head.weight"] = torch.zeros(3)
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "w")
    text = str(err.value)
    assert "model_best.pth" in text and "refiner" in text
    assert "missing keys: trans_head.1.weight" in text
    assert "unexpected keys: extra_head.weight" in text
    assert REFINER_RUN in text and SCORER_RUN in text  # says what the folder should contain


def test_wrong_shapes_and_missing_folders(nets, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_weights(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="found no refiner \\+ scorer pair"):
        load_weights(tmp_path / "empty")
    bad = RefineNet(c_in=4, use_bn=False)
    run = tmp_path / "r"
    run.mkdir()
    torch.save({"model": bad.state_dict()}, run / "model_best.pth")
    with pytest.raises(CheckpointError, match=r"encodeA.0.net.0.weight: file \(64, 4, 7, 7\) vs model \(64, 6, 7, 7\)"):
        load_network(run)
    # ... unless the config says so. Keys a config.yml leaves out take upstream's
    # backward-compatibility defaults (c_in 4, use_BN false, normalize_xyz false, ...).
    (run / "config.yml").write_text(yaml.safe_dump({"trans_normalizer": [0.02, 0.02, 0.05]}))
    model, cfg = load_network(run)
    assert model.c_in == 4 and cfg.kind == "refiner"
    assert cfg["use_BN"] is False and cfg["normalize_xyz"] is False and cfg["crop_ratio"] == 1.2
    assert cfg["zfar"] == 3 and cfg["rot_rep"] == "axis_angle" and cfg["trans_rep"] == "tracknet"
    # normalize_xyz false needs a trans_normalizer (upstream reads it unconditionally then)
    (run / "config.yml").write_text(yaml.safe_dump({"c_in": 4}))
    with pytest.raises(CheckpointError, match="trans_normalizer must be set"):
        load_network(run)


def test_missing_scorer_keys_take_upstream_defaults():
    from chunkpose.models import make_config

    cfg = make_config("scorer", {"c_in": 6})
    assert cfg["use_BN"] is False and cfg["normalize_xyz"] is False and cfg["crop_ratio"] == 1.2
    assert cfg["zfar"] == float("inf") and cfg.crop_size == 160
    assert make_config("scorer", {"crop_ratio": None})["crop_ratio"] == 1.2  # null counts as missing
    official = make_config("scorer")  # no config at all: the official run's values
    assert official["use_BN"] is True and official["normalize_xyz"] is True and official["crop_ratio"] == 1.1


def test_python_tags_in_config_are_read(nets, weights_dir, tmp_path):
    shutil.copytree(weights_dir, tmp_path / "w")
    cfg = tmp_path / "w" / SCORER_RUN / "config.yml"
    cfg.write_text("input_resize: !!python/tuple [160, 160]\ncrop_ratio: 1.1\nuse_BN: true\nc_in: 6\n"
                   "normalize_xyz: true\n")
    _, _, configs = load_weights(tmp_path / "w")
    assert configs["scorer"].crop_size == 160


@pytest.fixture(scope="module")
def small_weights_dir(nets, tmp_path_factory):
    """The same random weights, configured for 32 px crops (fast on CPU)."""
    root = tmp_path_factory.mktemp("fp_small") / "weights"
    save_weights(root, *nets, refiner_config={"input_resize": [32, 32]},
                 scorer_config={"input_resize": [32, 32]})
    return root


def test_pose_estimator_loads_the_learned_pair_through_weights(nets, small_weights_dir):
    import trimesh

    from chunkpose import PoseEstimator
    from chunkpose.pipeline.learned import LearnedRefiner, LearnedScorer

    class NoRenderer:  # construction only; nothing is rendered here
        device = torch.device("cpu")

    est = PoseEstimator(trimesh.creation.box(extents=(0.08, 0.06, 0.05)), budget_gb=1.0, device="cpu",
                        weights=small_weights_dir, renderer=NoRenderer())
    assert isinstance(est.refiner, LearnedRefiner) and isinstance(est.scorer, LearnedScorer)
    assert_same_weights(est.refiner.model, nets[0])
    assert_same_weights(est.scorer.model, nets[1])
    assert est.refiner.crop_size == 32


@pytest.mark.gl
def test_registration_with_random_learned_weights_chunked_equals_unchunked(small_weights_dir):
    """The small CI case of issue 6: same final pose unbounded and under a tight budget."""
    import numpy as np
    import trimesh

    from chunkpose import PoseEstimator, load_mesh
    from chunkpose.ops.render import make_renderer

    box = trimesh.creation.box(extents=(0.08, 0.06, 0.05))
    box.visual.vertex_colors = [200, 80, 40, 255]
    mesh = load_mesh(box)
    K = np.array([[200.0, 0, 80], [0, 200.0, 60], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, 3] = [0.01, -0.005, 0.5]
    full = make_renderer(mesh.centered(), "cpu", backend="gl").render_full(
        torch.as_tensor(pose, dtype=torch.float32), torch.as_tensor(K, dtype=torch.float32), 160, 120)
    rgb = (full["rgb"][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    depth = full["depth"][0].numpy().astype(np.float32)
    mask = full["mask"][0].numpy()
    runs = []
    for budget in (None, 0.5):
        est = PoseEstimator(mesh, budget_gb=budget, device="cpu", weights=small_weights_dir, hypotheses=6,
                            refine_iterations=2)
        if budget is not None:
            est.engine.max_chunk = 2  # force several chunks per stage
        seen = {}
        refine, score = est.refiner.refine_many, est.scorer.score_many

        def keep(key, fn):  # the last call's result: the registration's (a calibration run comes first)
            def wrapped(*a, **k):
                out = fn(*a, **k)
                seen[key] = out[0]  # the one object's
                return out
            return wrapped

        est.refiner.refine_many, est.scorer.score_many = keep("poses", refine), keep("scores", score)
        result = est.register(rgb, depth, K, mask)
        runs.append((result, seen))
    (plain, plain_seen), (chunked, chunked_seen) = runs
    # Every hypothesis is refined and scored alike, and the same pose comes out.
    np.testing.assert_allclose(chunked_seen["poses"].numpy(), plain_seen["poses"].numpy(), atol=1e-5)
    np.testing.assert_allclose(chunked_seen["scores"].numpy(), plain_seen["scores"].numpy(), atol=1e-5)
    np.testing.assert_allclose(chunked.pose, plain.pose, atol=1e-5)
    for result, seen in runs:
        best = int(torch.argmax(seen["scores"]))
        np.testing.assert_allclose(result.pose, seen["poses"][best].double().numpy() @ est._offset, atol=1e-6)
    assert chunked.report.to_dict()["stages"]["refine.learned"]["n_chunks"] >= 3 * 2
