"""Measure where kornia 0.7.2's warp_perspective(align_corners=False) samples, once.

FoundationPose pins kornia 0.7.2, whose warp_perspective samples a source of width W at
p * W/(W-1) - 0.5 instead of the p = T^-1 q it is asked for. chunkpose reproduces that
offset (chunkpose.ops.crops.kornia072_offset); tests/test_upstream_inputs.py holds the
numbers this script printed, so the test suite never needs kornia 0.7.2 itself.

    pip download kornia==0.7.2 --no-deps -d /tmp/k072
    python -m zipfile -e /tmp/k072/kornia-0.7.2-py2.py3-none-any.whl /tmp/k072/site
    PYTHONPATH=/tmp/k072/site python scripts/measure_kornia072.py

Prints JSON: the sampled x and y positions of a few crop pixels for box crops of two
source sizes, and the share of nearest picks that land on another pixel than T^-1 q's.
"""
import json

import kornia
import torch


def coordinate_image(H: int, W: int) -> torch.Tensor:
    """(1,2,H,W): channel 0 holds each pixel's column, channel 1 its row."""
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.stack([u, v])[None]


def box_transform(left: float, top: float, scale: float) -> torch.Tensor:
    """Full-image pixel -> crop pixel: scale about (left, top)."""
    return torch.tensor([[[scale, 0.0, -left * scale], [0.0, scale, -top * scale], [0.0, 0.0, 1.0]]])


def measure(H: int, W: int, left: float, top: float, scale: float, size: int = 160) -> dict:
    image = coordinate_image(H, W)
    T = box_transform(left, top, scale)
    out = kornia.geometry.transform.warp_perspective(image, T, (size, size), mode="bilinear", align_corners=False)
    picks = [0, 1, size // 2, size - 1]
    near = kornia.geometry.transform.warp_perspective(image, T, (size, size), mode="nearest", align_corners=False)
    exact = left + torch.arange(size, dtype=torch.float64) / scale
    moved = (near[0, 0, 0].double() != torch.round(exact)).double().mean().item()
    return {
        "source_hw": [H, W], "left": left, "top": top, "scale": scale, "crop_pixels": picks,
        "x": [round(float(out[0, 0, 0, j]), 4) for j in picks],
        "y": [round(float(out[0, 1, j, 0]), 4) for j in picks],
        "nearest_moved_fraction": round(moved, 4),
    }


def main() -> None:
    print(json.dumps({
        "kornia": kornia.__version__,
        "cases": [
            measure(480, 640, 300.0, 200.0, 1.6),
            measure(2048, 3072, 1500.0, 900.0, 0.4),
            measure(160, 160, 10.0, 20.0, 1.25),  # a crop as the source (the scorer's warp back)
        ],
    }, indent=1))


if __name__ == "__main__":
    main()
