"""Depth clean-up and point maps: naive per-pixel references, C++ vs torch, banding."""
import numpy as np
import pytest
import torch

import chunkpose.ops as ops
from chunkpose.ops import depth as depth_ops
from test_ops_common import (BACKENDS, HAS_EXT, K_SMALL, naive_bilateral, naive_erode, naive_xyz_map, run,
                             synthetic_depth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,shape", [(0, (29, 41)), (1, (7, 5)), (2, (3, 17))])
def test_erode_equals_naive_exactly(backend, seed, shape):
    d = synthetic_depth(*shape, seed=seed)
    out = run(backend, ops.erode_depth, d)
    ref = naive_erode(d)
    assert torch.equal(out, ref)
    if shape[0] > 10:  # the larger map exercises both branches: kept and eroded valid pixels
        assert (out > 0).any() and ((out == 0) & (d > 0.001) & (d < 100)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_erode_parameters(backend):
    d = synthetic_depth(17, 23, seed=3)
    out = run(backend, ops.erode_depth, d, radius=1, depth_diff_thres=0.002, ratio_thres=0.5, zfar=1.0)
    assert torch.equal(out, naive_erode(d, radius=1, diff=0.002, ratio=0.5, zfar=1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,shape", [(0, (29, 41)), (4, (6, 9))])
def test_bilateral_equals_naive(backend, seed, shape):
    d = synthetic_depth(*shape, seed=seed, holes=0.3)
    out = run(backend, ops.bilateral_filter_depth, d)
    ref = naive_bilateral(d)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert ((d == 0) & (out > 0)).any(), "the filter fills holes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bilateral_range_term_and_empty_windows(backend):
    d = synthetic_depth(15, 19, seed=5)
    d[:8, :8] = 0.0  # a window with nothing valid -> 0
    out = run(backend, ops.bilateral_filter_depth, d, sigma_d=1.5, sigma_r=0.01)
    torch.testing.assert_close(out, naive_bilateral(d, sigma_d=1.5, sigma_r=0.01), atol=1e-6, rtol=0)
    assert out[2, 2] == 0


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_filters_ext_matches_torch_on_a_larger_map():
    d = synthetic_depth(240, 320, seed=6)
    with ops.torch_path():
        e_t, b_t = ops.erode_depth(d), ops.bilateral_filter_depth(d)
    assert torch.equal(ops.erode_depth(d), e_t)
    torch.testing.assert_close(ops.bilateral_filter_depth(d), b_t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_banded_filters_equal_whole_frame_exactly(backend):
    d = synthetic_depth(37, 23, seed=7)
    for whole_fn, band_fn in [(ops.erode_depth, depth_ops.erode_rows),
                              (ops.bilateral_filter_depth, depth_ops.bilateral_rows)]:
        whole = run(backend, whole_fn, d)
        for cuts in [(0, 1, 2, 3, 37), (0, 5, 6, 20, 35, 37), (0, 36, 37)]:
            bands = [run(backend, band_fn, torch.arange(a, b), depth=d) for a, b in zip(cuts, cuts[1:])]
            assert torch.equal(torch.cat(bands), whole), whole_fn.__name__


@pytest.mark.parametrize("backend", BACKENDS)
def test_filters_through_the_engine(backend):
    engine_mod = pytest.importorskip("chunkpose.engine")
    d = synthetic_depth(120, 64, seed=8)
    # A budget that forces several row bands.
    hints = run(backend, depth_ops.band_hints, d.shape[1], 2)
    # the map and its output, and room for about 20 rows of the filter at a time
    budget = (2 * d.numel() * 4 + hints["fixed_bytes"] + 20 * hints["per_item_bytes"]) / 0.98
    engine = engine_mod.Engine(budget_gb=budget / 2**30, device="cpu")
    for fn in (ops.erode_depth, ops.bilateral_filter_depth):
        whole = run(backend, fn, d)
        banded = run(backend, fn, d, engine=engine)
        assert torch.equal(banded, whole)
        del banded  # the next filter's budget holds the map and its own output only
    stage = engine.report.stages["depth.erode"]
    if hints["per_item_bytes"] * d.shape[0] <= d.numel() * 4:
        # the extension's filter holds nothing per row but its output row: one chunk returns
        # that output as it is, while bands would need an output buffer besides; one chunk is
        # the smallest plan, and the planner takes it
        assert stage.chunk_sizes == [d.shape[0]]
    else:
        assert len(stage.chunk_sizes) > 1
    assert engine.report.peak_bytes <= engine.budget_bytes
    report = str(engine.report.to_dict())
    assert "depth.erode" in report and "depth.bilateral" in report
    print(report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_to_xyz_formula_in_place_and_bands(backend):
    d = synthetic_depth(21, 33, seed=9)
    d[3, 4] = -1.0  # negative depth is invalid too
    ref = naive_xyz_map(d, K_SMALL)
    out = torch.full((21, 33, 3), 7.0)
    res = run(backend, ops.depth_to_xyz, d, K_SMALL, out=out)
    assert res is out and torch.equal(out, ref)
    assert torch.equal(out[3, 4], torch.zeros(3))
    # band by band into a preallocated full map
    band_out = torch.full((21, 33, 3), 7.0)
    for a, b in [(0, 4), (4, 5), (5, 21)]:
        run(backend, ops.depth_to_xyz, d[a:b], K_SMALL, out=band_out[a:b], row_offset=a)
    assert torch.equal(band_out, ref)
    # K as a float32 tensor gives the same map
    assert torch.equal(run(backend, ops.depth_to_xyz, d, torch.tensor(K_SMALL, dtype=torch.float32)), ref)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_depth_to_xyz_ext_equals_torch_large():
    d = synthetic_depth(480, 640, seed=10)
    with ops.torch_path():
        t = ops.depth_to_xyz(d, K_SMALL)
    assert torch.equal(ops.depth_to_xyz(d, K_SMALL), t)


def test_bad_inputs_are_named():
    d = synthetic_depth(8, 8)
    with pytest.raises(ValueError, match="depth"):
        ops.erode_depth(d[None])
    with pytest.raises(ValueError, match="millimetres"):
        ops.bilateral_filter_depth((d * 1000).to(torch.int32))
    with pytest.raises(ValueError, match="K"):
        ops.depth_to_xyz(d, np.eye(4))
    with pytest.raises(ValueError, match="out"):
        ops.depth_to_xyz(d, K_SMALL, out=torch.empty(8, 8, 2))
    with pytest.raises(ValueError, match="radius"):
        ops.erode_depth(d, radius=-1)


def test_numpy_input_and_backend_report():
    d = synthetic_depth(9, 11).numpy()
    assert ops.erode_depth(d).shape == (9, 11)
    assert ops.backend() in ("cuda", "cpp", "torch")
    with ops.torch_path():
        assert ops.backend("cpu") == "torch"


def test_no_ext_env_var_forces_torch_path():
    import subprocess
    import sys

    code = "import chunkpose.ops as o; print(o.backend('cpu'))"
    env = dict(__import__("os").environ, CHUNKPOSE_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


@pytest.mark.cuda
def test_cuda_filters_and_xyz_match_cpu():
    d = synthetic_depth(200, 300, seed=11)
    cpu = (ops.erode_depth(d), ops.bilateral_filter_depth(d), ops.depth_to_xyz(d, K_SMALL))
    dc = d.cuda()
    gpu = (ops.erode_depth(dc), ops.bilateral_filter_depth(dc), ops.depth_to_xyz(dc, K_SMALL))
    assert torch.equal(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-6, rtol=0)
    assert torch.equal(gpu[2].cpu(), cpu[2])
    with ops.torch_path():
        assert torch.equal(ops.erode_depth(dc).cpu(), cpu[0])
        assert torch.equal(ops.depth_to_xyz(dc, K_SMALL).cpu(), cpu[2])
