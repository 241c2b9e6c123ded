"""Fine-tuning under a budget: gradient accumulation is exact, checkpointing saves memory
and lets the engine pick a larger micro-batch. Small crops (32-64 px) keep it fast on CPU."""
import pytest
import torch

from chunkpose.engine import Engine, Meter
from chunkpose.models import RefineNet
from chunkpose.training import finetune, random_pairs, training_step, update_targets, perturb_poses


def _model(seed=0):
    torch.manual_seed(seed)
    return RefineNet().eval()


def _batch(n, size, seed=0):
    return random_pairs(size=size)(0, n, torch.Generator().manual_seed(seed))


def test_accumulated_gradient_equals_full_batch_gradient():
    batch = _batch(4, 16)
    model = _model()
    model.checkpointing = False
    loss_whole, slices_whole = training_step(model, batch, Engine(None))
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.checkpointing = True
    loss_chunked, slices = training_step(model, batch, Engine(8.0, max_chunk=1))
    assert slices_whole == [4]
    assert sum(slices) == 4 and max(slices) == 1  # four micro-batches of one, each counted once
    assert loss_chunked == pytest.approx(loss_whole, rel=1e-5)
    for g0, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, g0, rtol=1e-4, atol=1e-7)


def _step_peak(checkpointing, batch):
    model = _model()
    model.checkpointing = checkpointing
    meter = Meter("cpu")
    with meter.span() as span:
        training_step(model, batch, None)
    return span.peak_bytes


def test_checkpointing_lowers_the_measured_peak_of_a_training_step():
    batch = _batch(4, 64)
    plain = _step_peak(False, batch)
    ckpt = _step_peak(True, batch)
    # The slice's parameter gradients (64 MiB) are common to both; activations differ.
    assert ckpt < plain - 4 * 2**20, (plain / 2**20, ckpt / 2**20)


def test_finetune_under_a_budget_trains_and_reports():
    torch.manual_seed(0)
    model = RefineNet()
    before = model.trans_head[1].weight.detach().clone()
    result = finetune(model, steps=2, budget_gb=None, batch_size=3, pairs=random_pairs(size=16),
                      engine=Engine(1.0, max_chunk=2), lr=1e-3)
    assert len(result.losses) == 2 and all(l > 0 for l in result.losses)
    assert result.micro_batches == [[2, 1], [2, 1]]  # gradient accumulation over micro-batches
    assert not torch.equal(before, model.trans_head[1].weight)
    assert result.report is not None and result.report.stages["finetune.step"].calls == 2
    assert model.checkpointing is None and not model.training  # restored


def test_update_targets_move_hypotheses_onto_truth():
    from chunkpose.models import apply_update

    g = torch.Generator().manual_seed(3)
    truth = torch.eye(4).repeat(5, 1, 1)
    truth[:, :3, 3] = torch.tensor([0.05, -0.02, 0.7])
    hyp = perturb_poses(truth, 15.0, 0.01, g)
    trans, rot = update_targets(hyp, truth, diameter=0.2)
    rn = 0.349
    # the network output that yields exactly `rot` after tanh * rot_normalizer
    raw = torch.atanh(rot / rn)
    moved = apply_update(hyp, trans, raw, diameter=0.2, rot_normalizer=rn)
    torch.testing.assert_close(moved, truth, rtol=0, atol=1e-5)


def test_checkpointing_lets_the_engine_pick_a_larger_micro_batch():
    batch = _batch(8, 64)
    budget = 0.215  # GiB: the parameters, their gradients and a few 64 px items
    picked = {}
    for checkpointing in (False, True):
        model = _model()
        model.checkpointing = checkpointing
        engine = Engine(budget)
        _, slices = training_step(model, batch, engine)
        assert sum(slices) == 8
        assert engine.report.stages["finetune.step"].peak_bytes <= engine.budget_bytes
        picked[checkpointing] = max(slices)
    assert picked[True] > picked[False], picked


@pytest.mark.gl
def test_rendered_pairs_match_the_refiner_inputs_and_train():
    import trimesh

    from chunkpose.io.mesh import load_mesh
    from chunkpose.training import RenderedPairs

    box = trimesh.creation.box(extents=(0.08, 0.06, 0.05))
    box.visual.vertex_colors = [200, 80, 40, 255]
    pairs = RenderedPairs(mesh=load_mesh(box), size=32)
    batch = pairs(0, 3, torch.Generator().manual_seed(0))
    assert batch.A.shape == (3, 6, 32, 32) and batch.B.shape == (3, 6, 32, 32)
    assert batch.trans.shape == (3, 3) and batch.rot.shape == (3, 3)
    assert float(batch.rot.norm(dim=1).max()) <= 15 * 3.1416 / 180 + 1e-4  # the perturbation bound
    # both sides see the object (non-zero normalised xyz) and differ (the hypothesis is off)
    assert (batch.A[:, 3:] != 0).any() and (batch.B[:, 3:] != 0).any()
    assert not torch.allclose(batch.A, batch.B)
    torch.manual_seed(0)
    result = finetune(RefineNet(), steps=1, batch_size=2, pairs=pairs, engine=Engine(None))
    assert len(result.losses) == 1 and result.losses[0] > 0


@pytest.mark.gl
def test_scene_pairs_from_synth_frames():
    from chunkpose.training import ScenePairs

    pairs = ScenePairs(size=32, width=160, height=120, footprint=(0.1, 0.2))
    batch = pairs(0, 2, torch.Generator().manual_seed(0))
    assert batch.A.shape == (2, 6, 32, 32) and batch.B.shape == (2, 6, 32, 32)
    # the observed crops contain the object's surface near the hypothesis (valid xyz)
    assert (batch.B[:, 3:] != 0).float().mean() > 0.05
    assert (batch.A[:, 3:] != 0).float().mean() > 0.05
    assert float(batch.trans.abs().max()) <= 0.1 + 1e-5  # trans_frac * diameter / radius


def test_the_optimiser_state_is_counted_against_the_budget_once_it_exists():
    torch.manual_seed(0)
    model = RefineNet()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = Engine(2.0)
    live = []
    finetune(model, steps=2, batch_size=2, pairs=random_pairs(size=16), engine=engine,
             callback=lambda step, loss: live.append(engine.meter.live_bytes()),
             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    # weights + AdamW's two moments (the step's gradients are gone by then)
    assert all(b >= 3 * param_bytes for b in live), (live, param_bytes)
    assert engine.meter.live_bytes() < param_bytes  # all released after training
