"""Engine.map under budgets: results, measured peaks, plans, cache, OOM back-off, checkpointing."""
import gc
import json

import pytest
import torch

from chunkpose.engine import BudgetTooSmall, Engine, Meter, RunReport, choose_downscale

MiB = 2**20
GiB = 2**30


def three_temporaries(x):
    """Elementwise with known cost: a, b and the result live together (3 x item bytes)."""
    a = x * 2.0
    b = a + 1.0
    return b * x


def depth_rows_to_xyz(rows, depth, K):
    """rows (r,) int64 row indices, depth (H,W), K (3,3) -> xyz (r,W,3)."""
    z = depth[rows]
    u = torch.arange(depth.shape[1], dtype=depth.dtype)
    x = (u - K[0, 2]) / K[0, 0] * z
    y = (rows.to(depth.dtype)[:, None] - K[1, 2]) / K[1, 1] * z
    return torch.stack([x, y, z], dim=-1)


def plain_depth_to_xyz(depth, K):
    """The plain unchunked torch version: full-size x and y temporaries, then the stack."""
    H, W = depth.shape
    u = torch.arange(W, dtype=depth.dtype)
    v = torch.arange(H, dtype=depth.dtype)[:, None]
    x = (u - K[0, 2]) / K[0, 0] * depth
    y = (v - K[1, 2]) / K[1, 1] * depth
    return torch.stack([x, y, depth], dim=-1)


# ---------------------------------------------------------------- budgets, tight to loose
def test_elementwise_over_budgets_tight_to_loose():
    x = torch.randn(4096, 1024)  # 16 MiB in, 16 MiB out, 12 KiB transient per item
    expected = three_temporaries(x)
    chunks = []
    for budget_mib in (36, 40, 48, 64, 96):
        engine = Engine(budget_mib / 1024)
        out = engine.map(three_temporaries, x, name="elementwise")
        stage = engine.report.stages["elementwise"]
        assert torch.equal(out, expected)
        assert engine.report.peak_bytes <= engine.budget_bytes, (budget_mib, engine.report.summary())
        assert sum(stage.chunk_sizes) == x.shape[0]
        assert stage.predicted_peak_bytes <= engine.budget_bytes
        chunks.append(max(stage.chunk_sizes))
        del out
    assert chunks == sorted(chunks) and chunks[0] < chunks[-1], chunks
    assert chunks[0] >= 64  # a tight budget still makes progress in real chunks

    unbounded = Engine(None)
    out = unbounded.map(three_temporaries, x, name="elementwise")
    assert torch.equal(out, expected)
    assert unbounded.report.stages["elementwise"].chunk_sizes == [4096]
    assert unbounded.report.stages["elementwise"].n_chunks == 1


def test_loose_budget_runs_one_chunk_and_returns_op_result():
    x = torch.randn(64, 16)
    engine = Engine(1.0)
    out = engine.map(three_temporaries, x, name="small")
    assert engine.report.stages["small"].chunk_sizes == [64]
    assert torch.equal(out, three_temporaries(x))


# ---------------------------------------------------------------- the full-frame example
def test_depth_to_xyz_2048x3072_under_128_mib():
    H, W = 2048, 3072
    depth = torch.rand(H, W) * 2.0 + 0.3
    K = torch.tensor([[2400.0, 0.0, 1535.5], [0.0, 2400.0, 1023.5], [0.0, 0.0, 1.0]])

    engine = Engine(budget_gb=0.125)
    xyz = engine.map(depth_rows_to_xyz, torch.arange(H), name="depth.xyz", depth=depth, K=K)
    stage = engine.report.stages["depth.xyz"]
    assert engine.report.peak_bytes <= 128 * MiB
    # input 24 MiB + output 72 MiB are part of the measured peak
    assert engine.report.peak_bytes >= 96 * MiB
    assert stage.n_chunks > 1 and sum(stage.chunk_sizes) == H
    assert stage.estimate_source == "fake"

    reference = plain_depth_to_xyz(depth, K)
    assert torch.equal(xyz, reference)
    del xyz, reference
    gc.collect()

    # The same meter on the plain unchunked version peaks above the budget (~144 MiB).
    meter = Meter("cpu")
    with meter.span("plain") as span:
        meter.track(depth, K, scope="span")
        plain = plain_depth_to_xyz(depth, K)
    del plain
    assert span.peak_bytes > 128 * MiB
    assert 140 * MiB <= span.peak_bytes <= 150 * MiB


# ---------------------------------------------------------------- cache
def test_second_call_with_same_signature_does_not_estimate():
    engine = Engine(0.05)
    x = torch.randn(2048, 512)
    first = engine.map(three_temporaries, x, name="cached")
    assert engine.planner.estimations == 1
    del first
    second = engine.map(three_temporaries, torch.randn(2048, 512), name="cached")  # same signature
    assert engine.planner.estimations == 1
    assert engine.planner.cache_hits == 1
    del second
    third = engine.map(three_temporaries, torch.randn(100, 256), name="cached")  # new per-item shape
    assert engine.planner.estimations == 2
    stage = engine.report.stages["cached"]
    assert stage.calls == 3 and stage.estimations == 2
    assert third.shape == (100, 256)


def test_hints_skip_estimation():
    engine = Engine(0.05)
    x = torch.randn(1000, 256)
    out = engine.map(three_temporaries, x, name="hinted", per_item_bytes=3 * 1024, fixed_bytes=0)
    assert torch.equal(out, three_temporaries(x))
    assert engine.planner.estimations == 0
    assert engine.report.stages["hinted"].estimate_source == "hint"


def test_first_chunk_corrects_an_underestimate_and_the_cache_keeps_it():
    x = torch.randn(4096, 1024)  # 16 MiB; the op really needs 12 KiB per item, the hint says 1 KiB
    engine = Engine(48 / 1024)
    out = engine.map(three_temporaries, x, name="corrected", per_item_bytes=1024)
    stage = engine.report.stages["corrected"]
    assert torch.equal(out, three_temporaries(x))
    assert stage.corrections == 1 and stage.per_item_bytes >= 3 * 4096
    assert engine.report.peak_bytes <= engine.budget_bytes
    assert stage.chunk_sizes[0] == 1  # a hint says nothing about outputs: one item first
    del out
    engine.map(three_temporaries, x, name="corrected", per_item_bytes=1024)
    assert stage.corrections == 1 and engine.report.peak_bytes <= engine.budget_bytes


def test_fake_tracing_failure_falls_back_to_a_real_probe():
    def data_dependent(x):
        count = int((x > 0).sum())  # reads data: cannot run on fake tensors
        return x * count

    x = torch.randn(1000, 64)
    engine = Engine(0.01)
    out = engine.map(data_dependent, x, name="probed")
    assert torch.equal(out, data_dependent(x))
    assert engine.report.stages["probed"].estimate_source == "probe"
    assert "fake tracing failed" in engine.report.stages["probed"].estimate_note
    assert engine.report.peak_bytes <= engine.budget_bytes


# ---------------------------------------------------------------- out-of-memory and errors
def test_out_of_memory_above_a_size_backs_off_and_completes():
    calls = []

    def fails_above_100(x):
        calls.append(x.shape[0])
        if x.shape[0] > 100:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return x * 3.0

    x = torch.randn(1000, 32)
    engine = Engine(0.5)
    out = engine.map(fails_above_100, x, name="oom", per_item_bytes=128)
    stage = engine.report.stages["oom"]
    assert torch.equal(out, x * 3.0)
    assert stage.retries >= 1 and stage.oom_errors
    assert max(stage.chunk_sizes) <= 100 and sum(stage.chunk_sizes) == 1000

    # The failure is remembered: the next call plans below the failing size, no retries.
    retries = stage.retries
    del out
    again = engine.map(fails_above_100, x, name="oom", per_item_bytes=128)
    assert torch.equal(again, x * 3.0)
    assert stage.retries == retries


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("Cuda error: 2[cudaMalloc(&m_gpuPtr, bytes);]"),  # nvdiffrast's own allocation
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"),
])
def test_unbounded_runs_back_off_on_out_of_memory_too(error):
    """No budget set does not mean memory cannot run out: halve and retry, and say so."""
    calls = []

    def fails_above_100(x):
        calls.append(x.shape[0])
        if x.shape[0] > 100:
            raise error
        return x * 2.0

    x = torch.randn(1000, 8)
    engine = Engine(None)
    out = engine.map(fails_above_100, x, name="unbounded.oom")
    stage = engine.report.stages["unbounded.oom"]
    assert torch.equal(out, x * 2.0)
    assert calls[:4] == [1000, 500, 250, 125] and max(stage.chunk_sizes) <= 100
    assert stage.retries == 4 and len(stage.oom_errors) == 4 and sum(stage.chunk_sizes) == 1000


def test_unbounded_out_of_memory_at_one_item_and_other_errors_propagate():
    def always(x):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError, match="one item ran out of memory"):
        Engine(None).map(always, torch.randn(4, 2), name="never")

    def other(x):
        raise RuntimeError("Cuda error: 700[illegal address]")  # a real bug, not memory

    engine = Engine(None)
    with pytest.raises(RuntimeError, match="illegal address"):
        engine.map(other, torch.randn(4, 2), name="bug")
    assert engine.report.stages["bug"].retries == 0


def test_cpu_hard_cap_turns_an_underestimate_into_retries_under_the_budget():
    def quadratic(x):
        # memory grows with the square of the chunk: the linear model underestimates big chunks
        scratch = torch.ones(x.shape[0], x.shape[0], 64)
        return x + scratch.sum(dim=(1, 2))[:, None] * 0.0

    x = torch.randn(512, 64)
    engine = Engine(16 / 1024, hard_cap=True)
    out = engine.map(quadratic, x, name="capped", per_item_bytes=1024)
    stage = engine.report.stages["capped"]
    assert torch.equal(out, x)
    assert stage.retries >= 1 and all("CPU hard cap" in e for e in stage.oom_errors)
    assert engine.report.peak_bytes <= engine.budget_bytes


def test_value_error_inside_op_propagates_unchanged():
    def bad(x):
        if x.shape[0] < 1000:
            raise ValueError("depth looks like millimetres")
        return x

    engine = Engine(0.01)
    with pytest.raises(ValueError, match="depth looks like millimetres"):
        engine.map(bad, torch.randn(500, 8), name="bad", per_item_bytes=32)
    assert engine.report.stages["bad"].retries == 0


def test_budget_below_one_item_raises_before_allocating():
    def big_per_item(x):
        return x.repeat(1, 1000)  # 4 MB of output per item

    x = torch.randn(10, 1000)
    engine = Engine(0.001)  # ~1 MiB
    with pytest.raises(BudgetTooSmall) as info:
        engine.map(big_per_item, x, name="too.big")
    err = info.value
    assert err.minimum_bytes > engine.budget_bytes
    assert err.minimum_bytes >= 10 * 4_000_000  # the outputs alone
    assert f"{err.minimum_bytes / GiB:.3f} GiB" in str(err) and err.minimum_gb == err.minimum_bytes / GiB
    assert "too.big" in str(err)
    # nothing big was allocated: the measured peak stayed at the input's size
    assert engine.report.stages["too.big"].peak_bytes <= x.numel() * 4


def test_chunk_of_one_out_of_memory_gives_budget_too_small():
    def always_oom(x):
        raise torch.OutOfMemoryError("simulated")

    engine = Engine(0.01)
    with pytest.raises(BudgetTooSmall) as info:
        engine.map(always_oom, torch.randn(16, 4), name="never", per_item_bytes=16)
    assert info.value.minimum_bytes > engine.budget_bytes


# ---------------------------------------------------------------- autograd
def sin_cos_exp(x, w):
    a = x.sin()
    b = x.cos()
    return (a * b * w).exp()


def test_checkpointing_gives_same_gradients_with_lower_peak():
    x0 = torch.randn(512, 1024)
    w0 = torch.randn(1024)
    results = {}
    for checkpoint in (True, False):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        engine = Engine(0.0625, checkpoint=checkpoint, max_chunk=64)
        y = engine.map(sin_cos_exp, x, name="grad", w=w)
        y.sum().backward()
        stage = engine.report.stages["grad"]
        results[checkpoint] = (x.grad, w.grad, stage.chunk_sizes, engine.report.peak_bytes)
        assert stage.checkpointed == checkpoint

    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    sin_cos_exp(x, w).sum().backward()
    for checkpoint, (gx, gw, _, _) in results.items():
        assert torch.equal(gx, x.grad), checkpoint  # elementwise: exact
        torch.testing.assert_close(gw, w.grad)  # a reduction over items: to float tolerance
    assert results[True][2] == results[False][2] == [64] * 8  # the same chunks
    assert results[True][3] < results[False][3]  # checkpointing keeps only chunk inputs


def test_planner_counts_saved_activations_without_checkpointing():
    x = torch.randn(2048, 256, requires_grad=True)
    w = torch.randn(256)
    engine = Engine(0.02, checkpoint=False)
    y = engine.map(sin_cos_exp, x, name="saved", w=w)
    assert engine.report.peak_bytes <= engine.budget_bytes
    y.sum().backward()
    assert x.grad is not None


# ---------------------------------------------------------------- structures, residency, sessions
def test_tuple_dict_outputs_are_preallocated_and_filled():
    def several(x, scale):
        return {"double": x * scale, "pair": (x.sum(dim=1), x[:, :2].to(torch.float64))}

    x = torch.randn(3000, 128)
    engine = Engine(0.01, max_chunk=1000)
    out = engine.map(several, x, name="several", scale=2.0)
    assert engine.report.stages["several"].chunk_sizes == [1000, 1000, 1000]
    assert torch.equal(out["double"], x * 2.0)
    torch.testing.assert_close(out["pair"][0], x.sum(dim=1))
    assert out["pair"][1].dtype == torch.float64 and isinstance(out["pair"], tuple)


def test_op_output_without_item_axis_is_rejected():
    engine = Engine(0.01)
    with pytest.raises(ValueError, match="leading item axis"):
        engine.map(lambda x: x.sum(), torch.randn(10, 3), name="scalar", per_item_bytes=16)
    with pytest.raises(ValueError, match="leading length"):
        engine.map(lambda a, b: a + b, torch.randn(10, 3), torch.randn(9, 3), name="mismatch")


def test_resident_tensors_count_against_the_budget():
    x = torch.randn(2048, 256)  # 2 MiB
    weights = torch.randn(3 * MiB // 4)  # 3 MiB resident
    free = Engine(0.01)
    free.map(three_temporaries, x, name="s")
    loaded = Engine(0.01)
    with loaded.resident(weights):
        assert loaded.available_bytes() == loaded.budget_bytes - 3 * MiB
        loaded.map(three_temporaries, x, name="s")
    assert loaded.available_bytes() == loaded.budget_bytes
    assert max(loaded.report.stages["s"].chunk_sizes) < max(free.report.stages["s"].chunk_sizes)
    assert loaded.report.peak_bytes <= loaded.budget_bytes
    assert loaded.report.peak_bytes >= 3 * MiB + 4 * MiB  # weights + input + output


def test_session_peak_covers_its_map_calls_and_report_accumulates():
    x = torch.randn(2048, 256)
    engine = Engine(0.02)
    with engine.session("frame") as span:
        y = engine.map(three_temporaries, x, name="a")
        z = engine.map(three_temporaries, y, name="b")
        z = engine.map(three_temporaries, z, name="b")
    report = engine.report
    assert report.sessions["frame"]["peak_bytes"] == span.peak_bytes
    assert report.peak_bytes == span.peak_bytes <= engine.budget_bytes
    assert span.peak_bytes >= max(s.peak_bytes for s in report.stages.values())
    assert report.stages["b"].calls == 2 and report.stages["a"].calls == 1
    data = json.loads(json.dumps(report.to_dict()))
    assert data["stages"]["b"]["calls"] == 2 and data["budget_bytes"] == engine.budget_bytes
    assert data["downscale_factor"] == 1.0 and data["downscale_reason"] is None
    text = report.summary()
    assert "a" in text and "peak" in text and len(text.splitlines()) == 2 + 2 + 1
    assert isinstance(report, RunReport)


def test_budget_argument_is_validated():
    with pytest.raises(ValueError, match="budget_gb"):
        Engine(-1.0)
    with pytest.raises(ValueError, match="budget_gb"):
        Engine("4")
    assert Engine(0.125).budget_bytes == 2**27


# ---------------------------------------------------------------- downscale decision
def test_choose_downscale_candidates_search_and_failure():
    def need(scale):  # fixed 10 MiB + 100 MiB times the area
        return int(10 * MiB + 100 * MiB * scale * scale)

    assert choose_downscale(need, 200 * MiB) == 1.0
    assert choose_downscale(need, 40 * MiB, candidates=[1.0, 0.75, 0.5, 0.25]) == 0.5
    scale = choose_downscale(need, 40 * MiB)
    assert need(scale) <= 40 * MiB < need(scale + 1 / 128)
    with pytest.raises(BudgetTooSmall) as info:
        choose_downscale(need, 10 * MiB, candidates=[1.0, 0.5])
    assert info.value.minimum_bytes == need(0.5)


def test_note_downscale_records_and_warns():
    engine = Engine(0.5)
    with pytest.warns(UserWarning, match="downscaled"):
        engine.note_downscale(0.5, "budget 0.5 GiB below the 0.9 GiB minimum at full size")
    assert engine.report.to_dict()["downscale_factor"] == 0.5


# ---------------------------------------------------------------- CUDA (skipped without a GPU)
def wide_hidden_layer(rows, w1, w2):
    """rows (c,1024) -> (c,8192) hidden -> (c,256): ~64 KiB of temporaries per 4 KiB row."""
    hidden = torch.relu(rows @ w1)
    return hidden.sin() @ w2


@pytest.mark.cuda
@pytest.mark.parametrize("budget_gb", [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
def test_cuda_allocator_peak_stays_under_budget(budget_gb):
    gc.collect()
    torch.cuda.empty_cache()
    # unchunked, the temporaries alone would take ~1.5x the budget: every budget must chunk
    x = torch.randn(int(budget_gb * 16384), 1024, device="cuda")
    w1 = torch.randn(1024, 8192, device="cuda") / 32.0
    w2 = torch.randn(8192, 256, device="cuda") / 90.0
    wide_hidden_layer(x[:8], w1, w2)  # the cuBLAS workspace exists before the engine starts
    engine = Engine(budget_gb, device="cuda")
    out = engine.map(wide_hidden_layer, x, name="cuda.op", w1=w1, w2=w2)
    torch.cuda.synchronize()
    stage = engine.report.stages["cuda.op"]
    assert stage.n_chunks > 1
    assert engine.report.peak_bytes <= engine.budget_bytes, engine.report.summary()
    assert engine.report.peak_allocated_bytes <= engine.report.peak_bytes
    out_cpu = out.cpu()
    del out
    expected = wide_hidden_layer(x, w1, w2).cpu()
    torch.testing.assert_close(out_cpu, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_elementwise_exact_and_hard_cap():
    x = torch.randn(1 << 26, device="cuda")  # 256 MiB
    engine = Engine(1.0, device="cuda", hard_cap=True)
    out = engine.map(three_temporaries, x, name="cuda.elementwise")
    assert torch.equal(out, three_temporaries(x))
    assert engine.report.peak_bytes <= engine.budget_bytes


@pytest.mark.cuda
def test_cuda_checkpointing_gradients():
    x = torch.randn(8192, 1024, device="cuda", requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)
    engine = Engine(0.25, device="cuda")
    engine.map(sin_cos_exp, x, name="cuda.grad", w=w).sum().backward()
    assert engine.report.peak_bytes <= engine.budget_bytes
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    sin_cos_exp(x, w).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- several groups as one stage
def scaled_rows(x, *, scale, shift=0.0):
    """Per-item op with per-group arguments; returns a dict like the pipeline's ops."""
    y = three_temporaries(x) * scale + shift
    return {"y": y, "total": y.sum(1)}


def test_map_groups_equals_each_group_alone_and_chunks_span_groups():
    groups = [((torch.randn(n, 4096),), {"scale": float(n)}) for n in (5, 9, 3)]
    plain = [scaled_rows(*mapped, shift=1.0, **kwargs) for mapped, kwargs in groups]
    # bounded: 4096 floats = 16 KiB per item, a few items per chunk
    engine = Engine(0.9 * MiB / GiB)
    with engine.call("frame"):
        out = engine.map_groups(scaled_rows, groups, name="grouped", shift=1.0)
    stage = engine.report.stages["grouped"]
    assert stage.calls == 1 and stage.items == 17 and sum(stage.chunk_sizes) == 17
    assert stage.n_chunks > 1
    starts = [sum(stage.chunk_sizes[:i]) for i in range(len(stage.chunk_sizes))]
    spanning = [(a, a + c) for a, c in zip(starts, stage.chunk_sizes) if any(a < edge < a + c for edge in (5, 14))]
    assert spanning, (stage.chunk_sizes, "a chunk should hold items of two groups")
    for got, want in zip(out, plain):
        assert torch.allclose(got["y"], want["y"]) and torch.allclose(got["total"], want["total"])
    assert engine.report.peak_bytes <= engine.budget_bytes


def test_map_groups_shares_the_first_groups_cost_model_and_checks_shapes():
    engine = Engine(0.05)
    x = torch.randn(64, 512)
    engine.map(three_temporaries, x, name="kind")  # models the stage
    assert engine.planner.estimations == 1
    out = engine.map_groups(three_temporaries, [((torch.randn(10, 512),), {}), ((torch.randn(7, 512),), {})],
                            name="kind")
    assert engine.planner.estimations == 1 and [o.shape[0] for o in out] == [10, 7]
    with pytest.raises(ValueError, match="group 1 of map_groups has per-item shapes"):
        engine.map_groups(three_temporaries, [((torch.randn(3, 512),), {}), ((torch.randn(3, 256),), {})], name="kind")
    with pytest.raises(ValueError, match="at least one group"):
        engine.map_groups(three_temporaries, [], name="kind")
