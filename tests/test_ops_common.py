"""Helpers shared by the tests/test_ops_*.py files (no tests here): small synthetic depth maps and
per-pixel references written as plainly as possible."""
from __future__ import annotations

import math

import numpy as np
import torch

import chunkpose.ops as ops

#: Whether the compiled CPU kernels are there; the parametrisation of backend-vs-backend tests.
HAS_EXT = ops.backend("cpu") == "cpp"
BACKENDS = ["ext", "torch"] if HAS_EXT else ["torch"]


def run(backend, fn, *args, **kwargs):
    """fn(*args, **kwargs) on the extension ("ext") or on the pure-torch path ("torch")."""
    if backend == "torch":
        with ops.torch_path():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


K_SMALL = np.array([[60.0, 0.0, 20.3], [0.0, 62.0, 14.7], [0.0, 0.0, 1.0]])


def synthetic_depth(H=29, W=41, seed=0, holes=0.2, zfar_pixels=0.02) -> torch.Tensor:
    """A tilted plane with a step edge, noise around the 1 mm threshold, holes and far pixels."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    d = 0.8 + 0.004 * u + 0.002 * v
    d[:, W // 2:] += 0.05  # step edge
    d += 0.0012 * torch.randn(H, W, generator=g)  # straddles the 1 mm threshold
    d[torch.rand(H, W, generator=g) < holes] = 0.0
    d[torch.rand(H, W, generator=g) < zfar_pixels] = 150.0  # beyond zfar
    d[0, :3] = 0.0  # a hole on the border
    return d.contiguous()


def naive_erode(depth, radius=2, diff=0.001, ratio=0.8, zfar=100.0):
    d = depth.numpy().astype(np.float32)
    H, W = d.shape
    out = np.zeros_like(d)
    for y in range(H):
        for x in range(W):
            c = d[y, x]
            if c < np.float32(0.001) or c >= np.float32(zfar):
                continue
            bad = total = 0
            for yy in range(max(0, y - radius), min(H, y + radius + 1)):
                for xx in range(max(0, x - radius), min(W, x + radius + 1)):
                    total += 1
                    n = d[yy, xx]
                    if n < np.float32(0.001) or n >= np.float32(zfar) or abs(n - c) > np.float32(diff):
                        bad += 1
            if not np.float32(bad) / np.float32(total) > np.float32(ratio):
                out[y, x] = c
    return torch.from_numpy(out)


def naive_bilateral(depth, radius=2, sigma_d=2.0, sigma_r=1e5, zfar=100.0):
    d = depth.numpy().astype(np.float64)
    H, W = d.shape
    out = np.zeros((H, W))
    for y in range(H):
        for x in range(W):
            win = [(yy, xx) for yy in range(max(0, y - radius), min(H, y + radius + 1))
                   for xx in range(max(0, x - radius), min(W, x + radius + 1))]
            valid = [d[p] for p in win if 0.001 <= d[p] < zfar]
            if not valid:
                continue
            mean = sum(valid) / len(valid)
            sw = swd = 0.0
            for yy, xx in win:
                n = d[yy, xx]
                if 0.001 <= n < zfar and abs(n - mean) < 0.01:
                    w = math.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma_d ** 2)
                                 - (d[y, x] - n) ** 2 / (2 * sigma_r ** 2))
                    sw += w
                    swd += w * n
            out[y, x] = swd / sw if sw > 0 else 0.0
    return torch.from_numpy(out).float()


def look_at_poses(B, t=(0.01, -0.005, 0.9), spread=0.03, seed=0):
    """B object-in-camera poses around t with random rotations (float64 numpy)."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (B, 1, 1))
    poses[:, :3, :3] = Rotation.random(B, random_state=rng).as_matrix()
    poses[:, :3, 3] = np.asarray(t) + rng.uniform(-spread, spread, size=(B, 3)) * np.array([1, 1, 0.3])
    return poses


def random_transforms(B, H, W, size, seed=0, projective=False):
    """Generic crop transforms (full pixel -> crop pixel) with scales that avoid exact .5 ties."""
    g = torch.Generator().manual_seed(seed)
    T = torch.zeros(B, 3, 3, dtype=torch.float64)
    for i in range(B):
        w = float(torch.empty(1).uniform_(0.4 * min(H, W), 0.9 * min(H, W), generator=g)) + 0.3137
        left = float(torch.empty(1).uniform_(-0.2 * W, 0.7 * W, generator=g)) + 0.01
        top = float(torch.empty(1).uniform_(-0.2 * H, 0.7 * H, generator=g)) + 0.02
        s = size / w
        A = torch.tensor([[s, 0.0, -s * left], [0.0, s * 1.07, -s * 1.07 * top], [0.0, 0.0, 1.0]], dtype=torch.float64)
        if projective:
            A[2, 0], A[2, 1] = 1e-4, -5e-5
            A[0, 1] = 0.03
        T[i] = A
    return T.float()


def naive_xyz_map(depth, K):
    """Full-frame point map by the formula, per pixel (float32 like the ops)."""
    d = depth.numpy().astype(np.float32)
    H, W = d.shape
    fx, fy, cx, cy = (np.float32(K[0, 0]), np.float32(K[1, 1]), np.float32(K[0, 2]), np.float32(K[1, 2]))
    out = np.zeros((H, W, 3), np.float32)
    for v in range(H):
        for u in range(W):
            z = d[v, u]
            if z < np.float32(0.001):
                continue
            out[v, u] = ((np.float32(u) - cx) * z / fx, (np.float32(v) - cy) * z / fy, z)
    return torch.from_numpy(out)
