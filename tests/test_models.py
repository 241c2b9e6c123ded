"""RefineNet / ScoreNetMultiPair: upstream names, shapes and sizes; the pose update;
gradient checkpointing gives the same gradients and saves memory.

Inputs are kept small (32x32 crops: 16 tokens) because the CPU is shared; the layers
do not care about the crop size up to 160x160.
"""
import math

import pytest
import torch

from chunkpose.models import RefineNet, ScoreNetMultiPair, apply_update
from chunkpose.ops.geometry import so3_exp
from chunkpose.models.blocks import sinusoid_table

# (key, shape) pairs of the official checkpoints' state dicts.
REFINER_KEYS = {
    "encodeA.0.net.0.weight": (64, 6, 7, 7),
    "encodeA.0.net.1.running_mean": (64,),
    "encodeA.2.conv1.weight": (128, 128, 3, 3),
    "encodeA.2.bn1.weight": (128,),
    "encodeAB.2.net.0.weight": (512, 256, 3, 3),
    "pos_embed.pe": (1, 400, 512),
    "trans_head.0.self_attn.in_proj_weight": (1536, 512),
    "trans_head.0.linear1.weight": (512, 512),
    "trans_head.0.norm1.weight": (512,),
    "trans_head.1.weight": (3, 512),
    "rot_head.1.weight": (3, 512),
}
SCORER_KEYS = {
    "encoderA.0.net.0.weight": (64, 6, 7, 7),
    "encoderA.2.conv1.weight": (128, 128, 3, 3),
    "encoderAB.2.net.0.weight": (512, 256, 3, 3),
    "pos_embed.pe": (1, 400, 512),
    "att.in_proj_weight": (1536, 512),
    "att_cross.in_proj_weight": (1536, 512),
    "att_cross.out_proj.weight": (512, 512),
    "linear.weight": (1, 512),
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_refinenet_upstream_keys_shapes_and_size():
    model = RefineNet(c_in=6)
    state = model.state_dict()
    for key, shape in REFINER_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # every conv has a bias (upstream bias=True), blocks have conv1/bn1/conv2/bn2
    assert "encodeA.0.net.0.bias" in state and "encodeAB.0.conv2.bias" in state
    assert {k.split(".")[0] for k in state} == {"encodeA", "encodeAB", "pos_embed", "trans_head", "rot_head"}
    assert n_params(model) == 16_830_406
    assert abs(n_params(model) / 1e6 - 16.8) < 0.05


def test_scorenet_upstream_keys_shapes_and_size():
    model = ScoreNetMultiPair(c_in=6)
    state = model.state_dict()
    for key, shape in SCORER_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert {k.split(".")[0] for k in state} == {"encoderA", "encoderAB", "pos_embed", "att", "att_cross", "linear"}
    assert n_params(model) == 15_773_121
    assert abs(n_params(model) / 1e6 - 15.8) < 0.05


def test_positional_table_is_sinusoidal():
    pe = RefineNet().pos_embed.pe[0]
    pos, i = 17, 10  # channel pair (2i, 2i+1)
    angle = pos / (10000 ** (2 * i / 512))
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert torch.equal(pe, sinusoid_table(400, 512))


def test_forward_shapes_and_scorer_split_equals_forward():
    torch.manual_seed(0)
    A, B = torch.rand(3, 6, 32, 32), torch.rand(3, 6, 32, 32)
    with torch.no_grad():
        out = RefineNet().eval()(A, B)
        assert out["trans"].shape == (3, 3) and out["rot"].shape == (3, 3)
        scorer = ScoreNetMultiPair().eval()
        logits = scorer(A, B)
        assert logits.shape == (1, 3)
        # the per-hypothesis part is independent per item: any slicing gives the same features
        feats = torch.cat([scorer.features(A[:1], B[:1]), scorer.features(A[1:], B[1:])])
        torch.testing.assert_close(scorer.cross(feats), logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="A must be"):
        RefineNet()(torch.rand(1, 4, 32, 32), torch.rand(1, 4, 32, 32))


def test_so3_exp_map_is_rodrigues_with_pytorch3d_clamp():
    from scipy.spatial.transform import Rotation

    w = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.0, 1.0], [1e-3, 0.0, 0.0]], dtype=torch.float64)
    R = so3_exp(w, eps=1e-4)
    ref = torch.from_numpy(Rotation.from_rotvec(w.numpy()).as_matrix())
    torch.testing.assert_close(R[:2], ref[:2], rtol=0, atol=1e-12)
    # below 0.01 rad the angle is clamped to 0.01 (pytorch3d's eps=1e-4 on |w|^2)
    theta = 0.01
    a, b = math.sin(theta) / theta, (1 - math.cos(theta)) / theta**2
    assert R[2, 1, 2].item() == pytest.approx(-a * 1e-3, rel=1e-12)
    assert R[2, 1, 1].item() == pytest.approx(1 - b * 1e-6, rel=1e-12)


def test_pose_update_rotates_in_camera_frame_and_scales_translation():
    from scipy.spatial.transform import Rotation

    R0 = torch.from_numpy(Rotation.from_rotvec([0.2, 0.5, -0.1]).as_matrix()).float()
    pose = torch.eye(4)[None].clone()
    pose[0, :3, :3] = R0
    pose[0, :3, 3] = torch.tensor([0.1, -0.05, 0.8])
    trans = torch.tensor([[0.5, -1.0, 0.25]])
    rot = torch.tensor([[0.4, -0.3, 0.2]])
    new = apply_update(pose, trans, rot, diameter=0.2, rot_normalizer=0.349)
    w = (torch.tanh(rot) * 0.349).double().numpy()
    dR = torch.from_numpy(Rotation.from_rotvec(w[0]).as_matrix().T).float()
    torch.testing.assert_close(new[0, :3, :3], dR @ R0, rtol=0, atol=1e-6)
    torch.testing.assert_close(new[0, :3, 3], pose[0, :3, 3] + trans[0] * 0.1)
    # zero output keeps the pose
    same = apply_update(pose, torch.zeros(1, 3), torch.zeros(1, 3), diameter=0.2)
    torch.testing.assert_close(same, pose)


def _grads(model, A, B, checkpointing, seed=0):
    model.checkpointing = checkpointing
    torch.manual_seed(seed)  # same dropout masks in both runs (train mode)
    model.zero_grad(set_to_none=True)
    A = A.clone().requires_grad_(True)
    out = model(A, B)
    loss = sum(((v - 0.1) ** 2).sum() for v in (out.values() if isinstance(out, dict) else [out]))
    loss.backward()
    return [p.grad.clone() for p in model.parameters()] + [A.grad.clone()]


@pytest.mark.parametrize("net", [RefineNet, ScoreNetMultiPair])
def test_checkpointing_gives_the_same_gradients(net):
    torch.manual_seed(0)
    model = net()
    model.train()  # train-mode BatchNorm and dropout: the hardest case for recomputation
    A, B = torch.rand(2, 6, 32, 32), torch.rand(2, 6, 32, 32)
    plain = _grads(model, A, B, checkpointing=False)
    stats_plain = model.encodeAB[0].bn1.running_mean.clone() if net is RefineNet else model.encoderAB[0].bn1.running_mean.clone()
    ckpt = _grads(model, A, B, checkpointing=True)
    stats_ckpt = model.encodeAB[0].bn1.running_mean if net is RefineNet else model.encoderAB[0].bn1.running_mean
    for g0, g1 in zip(plain, ckpt):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    # running statistics moved by exactly one more update (not two: recomputation restores them)
    # from zero: after one update m*mean, after two m*mean*(2-m); a double update in the
    # recomputation would give a third.
    momentum = 0.1
    bn = model.encodeAB[0].bn1 if net is RefineNet else model.encoderAB[0].bn1
    assert int(bn.num_batches_tracked) == 2
    torch.testing.assert_close(stats_ckpt, stats_plain * (2 - momentum), rtol=1e-4, atol=1e-7)


def test_checkpointing_default_follows_autograd():
    from chunkpose.models.blocks import checkpointing_active

    model = RefineNet().eval()
    x = torch.rand(1, 6, 32, 32)
    assert checkpointing_active(None, x, model)  # trainable parameters, grad mode on
    with torch.no_grad():
        assert not checkpointing_active(None, x, model)
        assert not checkpointing_active(True, x, model)
    model.requires_grad_(False)
    assert not checkpointing_active(None, x, model)
    assert checkpointing_active(None, x.requires_grad_(True), model)
