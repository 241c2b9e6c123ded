"""Crops from one image (vs kornia) and observed xyz crops (vs naive full-frame references)."""
import numpy as np
import pytest
import torch

import chunkpose.ops as ops
from chunkpose.ops.naive import naive_scorer_xyz_crops
from test_ops_common import (BACKENDS, HAS_EXT, K_SMALL, look_at_poses, naive_xyz_map, random_transforms, run,
                             synthetic_depth)

kornia = pytest.importorskip("kornia")


def kornia_warp(image, T, size, mode):
    B = T.shape[0]
    return kornia.geometry.transform.warp_perspective(image[None].expand(B, *image.shape), T, (size, size),
                                                     mode=mode, align_corners=False)


def near_tie(px, py, tol=1e-3):
    fx, fy = px - px.floor(), py - py.floor()
    return ((fx - 0.5).abs() < tol) | ((fy - 0.5).abs() < tol)


@pytest.mark.parametrize("projective", [False, True])
def test_warp_bilinear_matches_kornia(projective):
    img = torch.rand(3, 31, 45, generator=torch.Generator().manual_seed(0))
    T = random_transforms(7, 31, 45, 24, seed=1, projective=projective)
    out = ops.warp_crops(img, T, 24, "bilinear")
    ref = kornia_warp(img, T, 24, "bilinear")
    assert out.shape == (7, 3, 24, 24)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("projective", [False, True])
def test_warp_nearest_matches_kornia_exactly_away_from_ties(projective):
    img = torch.rand(2, 31, 45, generator=torch.Generator().manual_seed(2))
    T = random_transforms(7, 31, 45, 24, seed=3, projective=projective)
    out = ops.warp_crops(img, T, 24, "nearest")
    ref = kornia_warp(img, T, 24, "nearest")
    px, py = ops.sample_positions(T, 24)
    ambiguous = near_tie(px, py, tol=1e-4)[:, None].expand_as(out)  # float32 noise can flip these
    assert ambiguous.float().mean() < 0.01
    assert torch.equal(out[~ambiguous], ref[~ambiguous])


def test_nearest_ties_round_half_to_even_like_grid_sample():
    # Crop pixel q samples x = q/2 + 10: exact .5 ties for odd q. grid_sample(nearest) uses
    # nearbyint: 10.5 -> 10, 11.5 -> 12 (not floor(x + 0.5)).
    T = torch.tensor([[[2.0, 0.0, -20.0], [0.0, 2.0, -20.0], [0.0, 0.0, 1.0]]])
    img = torch.arange(40 * 40, dtype=torch.float32).reshape(1, 40, 40)
    out = ops.warp_crops(img, T, 8, "nearest")[0, 0]
    cols = (out[0] % 40).long().tolist()
    assert cols == [10, 10, 11, 12, 12, 12, 13, 14]
    # grid_sample itself on exact ties (width 32: the normalisation round trip is exact)
    img32 = torch.arange(32, dtype=torch.float32).reshape(1, 1, 1, 32)
    grid_x = (2 * torch.tensor([10.5, 11.5, 12.5]) + 1) / 32 - 1
    grid = torch.stack([grid_x, torch.zeros(3)], -1)[None, None]
    gs = torch.nn.functional.grid_sample(img32, grid, mode="nearest", align_corners=False)
    assert gs.flatten().long().tolist() == [10, 12, 12]


def test_warp_box3d_crops_equal_kornia_except_float32_ties():
    """Box_3d transforms often map crop pixels to exact .5 positions; kornia's float32 chain
    lands those on either side. Everywhere else nearest is exact."""
    K = np.array([[60.0, 0, 30.2], [0, 60.0, 20.1], [0, 0, 1]])
    cw = ops.crop_windows(look_at_poses(6, seed=4), K, 0.2, 1.2, size=20, image_size=(40, 60))
    img = torch.rand(1, 40, 60, generator=torch.Generator().manual_seed(5))
    out = ops.warp_crops(img, cw.transforms, 20, "nearest")
    ref = kornia_warp(img, cw.transforms, 20, "nearest")
    px, py = ops.sample_positions(cw.transforms, 20)
    differ = (out != ref)[:, 0]
    assert not (differ & ~near_tie(px, py)).any()
    assert differ.float().mean() < 0.2


def test_warp_from_roi_equals_full_frame():
    H, W = 60, 80
    img = torch.rand(3, H, W, generator=torch.Generator().manual_seed(6))
    cw = ops.crop_windows(look_at_poses(10, seed=7), np.array([[90.0, 0, 40.3], [0, 90.0, 29.8], [0, 0, 1]]),
                          0.25, 1.2, size=32, image_size=(H, W))
    rows, cols = cw.roi_slices()
    roi = img[:, rows, cols].clone()
    assert roi.shape[1] < H or roi.shape[2] < W
    for mode in ("nearest", "bilinear"):
        full = ops.warp_crops(img, cw.transforms, 32, mode)
        part = ops.warp_crops(roi, cw.transforms, 32, mode, origin=cw.origin)
        if mode == "nearest":
            assert torch.equal(part, full)
        else:
            torch.testing.assert_close(part, full, atol=1e-5, rtol=0)


def test_warp_does_not_copy_the_image_per_crop():
    meter_mod = pytest.importorskip("chunkpose.engine.meter")
    img = torch.rand(3, 400, 600)
    T = random_transforms(64, 400, 600, 16, seed=8)
    meter = meter_mod.Meter("cpu")
    with meter.span("warp") as span:
        out = ops.warp_crops(img, T, 16, "bilinear")
        out2 = ops.warp_crops(img, T, 16, "nearest")
    assert out.shape == out2.shape == (64, 3, 16, 16)
    assert span.peak_bytes < img.nbytes  # B copies would be 64x the image
    meter_grad = meter_mod.Meter("cpu")
    img.requires_grad_(True)
    with meter_grad.span("warp_backward") as span2:
        ops.warp_crops(img, T, 16, "bilinear").sum().backward()
    assert span2.peak_bytes < 3 * img.nbytes  # the gradient is image-sized, not (B,C,H,W)
    assert img.grad.shape == img.shape


# ----------------------------------------------------------------------------- xyz crops
@pytest.mark.parametrize("backend", BACKENDS)
def test_xyz_refiner_equals_nearest_warp_of_the_point_map(backend):
    d = synthetic_depth(40, 56, seed=9)
    T = random_transforms(6, 40, 56, 20, seed=10)
    out = run(backend, ops.xyz_crops, d, K_SMALL, T, 20, "refiner")
    full = naive_xyz_map(d, K_SMALL).permute(2, 0, 1)
    assert torch.equal(out, ops.warp_crops(full, T, 20, "nearest"))
    assert torch.equal(out, kornia_warp(full, T, 20, "nearest"))  # generic T: no ties


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["box3d", "random", "projective"])
def test_xyz_scorer_equals_naive_full_frame_reference_exactly(backend, kind):
    d = synthetic_depth(40, 56, seed=11, holes=0.1)
    if kind == "box3d":
        K = np.array([[120.0, 0, 28.4], [0, 120.0, 19.6], [0, 0, 1]])  # boxes larger than the crop
        T = ops.crop_windows(look_at_poses(5, seed=12), K, 0.25, 1.1, size=24, image_size=(40, 56)).transforms
    else:
        K = K_SMALL
        T = random_transforms(5, 40, 56, 24, seed=13, projective=kind == "projective")
    out = run(backend, ops.xyz_crops, d, K, T, 24, "scorer")
    ref = naive_scorer_xyz_crops(d, K, T, 24)
    assert torch.equal(out, ref)
    assert (out[:, 2] > 0).float().mean() > 0.3


def test_xyz_scorer_matches_a_kornia_reference_for_generic_transforms():
    """The upstream recipe literally (kornia warps both ways) agrees exactly when no sampling
    position is an ambiguous tie."""
    d = synthetic_depth(40, 56, seed=14, holes=0.1)
    T = random_transforms(4, 40, 56, 24, seed=15)
    B, (H, W) = 4, d.shape
    depth_crop = kornia_warp(d[None], T, 24, "nearest")  # (B,1,s,s)
    depth_back = kornia.geometry.transform.warp_perspective(depth_crop, torch.linalg.inv(T), (H, W),
                                                            mode="nearest", align_corners=False)[:, 0]
    xyz_back = torch.stack([naive_xyz_map(depth_back[b], K_SMALL).permute(2, 0, 1) for b in range(B)])
    ref = kornia.geometry.transform.warp_perspective(xyz_back, T, (24, 24), mode="nearest", align_corners=False)
    out = ops.xyz_crops(d, K_SMALL, T, 24, "scorer")
    assert (out == ref).float().mean() > 0.995


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semantics", ["refiner", "scorer"])
def test_xyz_crops_from_roi_equal_full_frame(backend, semantics):
    d = synthetic_depth(60, 80, seed=16)
    K = np.array([[90.0, 0, 40.3], [0, 90.0, 29.8], [0, 0, 1]])
    cw = ops.crop_windows(look_at_poses(8, seed=17), K, 0.25, 1.1, size=24, image_size=(60, 80))
    rows, cols = cw.roi_slices()
    full = run(backend, ops.xyz_crops, d, K, cw.transforms, 24, semantics)
    part = run(backend, ops.xyz_crops, d[rows, cols].clone(), K, cw.transforms, 24, semantics, origin=cw.origin)
    assert torch.equal(part, full)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("semantics", ["refiner", "scorer"])
def test_xyz_crops_ext_equals_torch(semantics):
    d = synthetic_depth(120, 160, seed=18)
    T = torch.cat([random_transforms(20, 120, 160, 32, seed=19),
                   random_transforms(5, 120, 160, 32, seed=20, projective=True)])
    with ops.torch_path():
        t = ops.xyz_crops(d, K_SMALL, T, 32, semantics, origin=(3, 2))
    assert torch.equal(ops.xyz_crops(d, K_SMALL, T, 32, semantics, origin=(3, 2)), t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_through_the_engine_equals_unchunked(backend):
    engine_mod = pytest.importorskip("chunkpose.engine")
    d = synthetic_depth(50, 70, seed=21)
    T = random_transforms(40, 50, 70, 16, seed=22)
    whole = run(backend, ops.xyz_crops, d, K_SMALL, T, 16, "scorer")
    img = torch.rand(3, 50, 70)
    warped = ops.warp_crops(img, T, 16, "bilinear")
    engine = engine_mod.Engine(budget_gb=(d.nbytes * 2 + img.nbytes + 12 * 16 * 16 * 100) / 2**30, device="cpu")
    assert torch.equal(run(backend, ops.xyz_crops, d, K_SMALL, T, 16, "scorer", engine=engine), whole)
    assert torch.equal(ops.warp_crops(img, T, 16, "bilinear", engine=engine), warped)
    stages = engine.report.to_dict()["stages"]
    assert stages["crops.xyz_scorer"]["n_chunks"] > 1


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_ext_ops_have_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        d = torch.empty(2048, 3072)
        T = torch.empty(252, 3, 3, dtype=torch.float64)
        out = torch.ops.chunkpose.xyz_crops(d, T, T, 1.0, 1.0, 0.0, 0.0, 160, 1, 0, 0)
        band = torch.ops.chunkpose.erode_depth(d, 10, 74, 2, 0.001, 0.8, 100.0)
        xyz = torch.empty(2048, 3072, 3)
        torch.ops.chunkpose.depth_to_xyz_out(d, 1.0, 1.0, 0.0, 0.0, 0, xyz)
    assert out.shape == (252, 3, 160, 160) and band.shape == (64, 3072)


def test_bad_inputs_are_named():
    d = synthetic_depth(10, 10)
    T = random_transforms(2, 10, 10, 8)
    with pytest.raises(ValueError, match="semantics"):
        ops.xyz_crops(d, K_SMALL, T, 8, "both")
    with pytest.raises(ValueError, match="transforms"):
        ops.xyz_crops(d, K_SMALL, T[:, :2], 8)
    with pytest.raises(ValueError, match="mode"):
        ops.warp_crops(d[None], T, 8, "bicubic")
    with pytest.raises(ValueError, match="image"):
        ops.warp_crops(d, T, 8)
    with pytest.raises(ValueError, match="origin"):
        ops.xyz_crops(d, K_SMALL, T, 8, origin=(0.5, 1))


@pytest.mark.cuda
@pytest.mark.parametrize("semantics", ["refiner", "scorer"])
def test_cuda_xyz_crops_and_warp_equal_cpu(semantics):
    d = synthetic_depth(120, 160, seed=23)
    T = random_transforms(30, 120, 160, 32, seed=24, projective=True)
    cpu = ops.xyz_crops(d, K_SMALL, T, 32, semantics)
    assert torch.equal(ops.xyz_crops(d.cuda(), K_SMALL, T.cuda(), 32, semantics).cpu(), cpu)
    with ops.torch_path():
        assert torch.equal(ops.xyz_crops(d.cuda(), K_SMALL, T.cuda(), 32, semantics).cpu(), cpu)
    img = torch.rand(3, 120, 160)
    assert torch.equal(ops.warp_crops(img.cuda(), T.cuda(), 32, "nearest").cpu(), ops.warp_crops(img, T, 32, "nearest"))
    torch.testing.assert_close(ops.warp_crops(img.cuda(), T.cuda(), 32).cpu(), ops.warp_crops(img, T, 32), atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_bilinear_ext_equals_torch_gather_exactly(dtype):
    """The csrc bilinear kernel and the torch gather do the same float64 arithmetic in the
    same order: identical crops, from uint8 (the frames' colour) or float images."""
    g = torch.Generator().manual_seed(30)
    img = (torch.rand(3, 60, 80, generator=g) * 255).to(dtype)
    T = torch.cat([random_transforms(9, 60, 80, 24, seed=31), random_transforms(3, 60, 80, 24, seed=32, projective=True)])
    ext = ops.warp_crops(img, T, 24, "bilinear", origin=(2, 1))
    with ops.torch_path():
        torch_out = ops.warp_crops(img, T, 24, "bilinear", origin=(2, 1))
    assert ext.dtype == torch.float32 and torch.equal(ext, torch_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bilinear_from_uint8_equals_the_float_image(backend):
    g = torch.Generator().manual_seed(33)
    img = (torch.rand(3, 40, 50, generator=g) * 255).to(torch.uint8)
    T = random_transforms(6, 40, 50, 16, seed=34)
    as_uint8 = run(backend, ops.warp_crops, img, T, 16, "bilinear")
    as_float = run(backend, ops.warp_crops, img.float(), T, 16, "bilinear")
    assert torch.equal(as_uint8, as_float)
    torch.testing.assert_close(as_float, kornia_warp(img.float(), T, 16, "bilinear"), atol=2e-3, rtol=0)
    nearest = run(backend, ops.warp_crops, img, T, 16, "nearest")
    assert nearest.dtype == torch.uint8  # nearest keeps the image's dtype (bool masks too)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semantics", ["refiner", "scorer"])
def test_on_demand_cleaning_equals_cleaning_the_frame_first(backend, semantics):
    """xyz crops of raw depth cleaned at the sampled pixels only equal those of the depth
    cleaned everywhere first, bitwise on the extension (the same per-pixel code), to float
    rounding on the torch path; including a ROI at the frame's border."""
    from chunkpose.ops.depth import CleanUp, OnDemandClean

    d = synthetic_depth(70, 90, seed=35)
    cleanup = CleanUp()
    cleaned = run(backend, cleanup.dense, d)
    T = random_transforms(8, 70, 90, 20, seed=36)
    seen = 0
    for roi in [(20, 15, 70, 55), (0, 0, 40, 30), (50, 40, 90, 70)]:
        x0, y0, x1, y1 = roi
        wx0, wy0, wx1, wy1 = max(0, x0 - 4), max(0, y0 - 4), min(90, x1 + 4), min(70, y1 + 4)
        raw = d[wy0:wy1, wx0:wx1].clone()
        dense = run(backend, ops.xyz_crops, cleaned[y0:y1, x0:x1].contiguous(), K_SMALL, T, 20, semantics,
                    origin=(x0, y0))
        lazy = run(backend, ops.xyz_crops, raw, K_SMALL, T, 20, semantics, origin=(wx0, wy0),
                   clean=OnDemandClean(roi=roi, full_size=(70, 90)))
        if backend == "ext":
            assert torch.equal(lazy, dense), roi
        else:
            torch.testing.assert_close(lazy, dense, atol=1e-6, rtol=0)
        seen += int((dense[:, 2] > 0).sum())
    assert seen > 500


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_on_demand_cleaning_checks_its_window():
    from chunkpose.ops.depth import OnDemandClean

    d = synthetic_depth(40, 40, seed=37)
    T = random_transforms(2, 40, 40, 8, seed=38)
    with pytest.raises(RuntimeError, match="halo"):  # the raw window lacks the 4-pixel halo
        ops.xyz_crops(d[10:30, 10:30].clone(), K_SMALL, T, 8, origin=(10, 10),
                      clean=OnDemandClean(roi=(10, 10, 30, 30), full_size=(40, 40)))


@pytest.mark.cuda
def test_cuda_bilinear_and_on_demand_cleaning_equal_cpu():
    from chunkpose.ops.depth import OnDemandClean

    g = torch.Generator().manual_seed(39)
    img = (torch.rand(3, 60, 80, generator=g) * 255).to(torch.uint8)
    T = random_transforms(10, 60, 80, 24, seed=40, projective=True)
    assert torch.equal(ops.warp_crops(img.cuda(), T.cuda(), 24).cpu(), ops.warp_crops(img, T, 24))
    d = synthetic_depth(60, 80, seed=41)
    clean = OnDemandClean(roi=(10, 8, 70, 52), full_size=(60, 80))
    raw = d[4:56, 6:74].clone()
    cpu = ops.xyz_crops(raw, K_SMALL, T, 24, "scorer", origin=(6, 4), clean=clean)
    gpu = ops.xyz_crops(raw.cuda(), K_SMALL, T.cuda(), 24, "scorer", origin=(6, 4), clean=clean)
    assert torch.equal(gpu.cpu(), cpu)
