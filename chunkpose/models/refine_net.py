"""RefineNet: FoundationPose's render-and-compare pose refiner, with upstream parameter names.

Input per hypothesis: A = the rendered crop, B = the observed crop, each (N,c_in,h,w)
(c_in = 6: rgb in 0..1 and normalised xyz, see chunkpose.pipeline.learned). Output: a
translation step `trans` (N,3) in units of the object radius and an axis-angle rotation
step `rot` (N,3) before tanh scaling; `apply_update` turns them into new poses.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from chunkpose.ops.geometry import so3_exp
from chunkpose.models.blocks import (
    PositionalEmbedding,
    checkpointing_active,
    encode_pair,
    encoder_a,
    encoder_ab,
    run_block,
)


def transformer_layer(d_model: int = 512, heads: int = 4) -> nn.TransformerEncoderLayer:
    """The heads' transformer layer: 512 wide, 4 heads, feed-forward 512, tokens batch-first.

    Args:
        d_model: token width (default 512).
        heads: attention heads (default 4).

    Returns:
        nn.TransformerEncoderLayer.
    """
    return nn.TransformerEncoderLayer(d_model=d_model, nhead=heads, dim_feedforward=512, batch_first=True)


class RefineNet(nn.Module):
    """encodeA / encodeAB trunk, positional embedding, transformer trans_head and rot_head.

    Each head's per-token output is averaged over the h/8 * w/8 tokens (at most 400).

    Args:
        c_in: input channels per side (default 6: rgb and normalised xyz).
        rot_dim: rotation output width (default 3: axis-angle).
        use_bn: BatchNorm in the encoder blocks (default True).
        checkpointing: None (default) = gradient checkpointing of every block exactly when
            autograd will need it; True/False force it on/off (off always under no_grad).
    """

    def __init__(self, c_in: int = 6, rot_dim: int = 3, use_bn: bool = True, checkpointing: Optional[bool] = None):
        super().__init__()
        self.c_in = c_in
        self.checkpointing = checkpointing
        self.encodeA = encoder_a(c_in, use_bn)
        self.encodeAB = encoder_ab(use_bn)
        self.pos_embed = PositionalEmbedding(d_model=512, max_len=400)
        self.trans_head = nn.Sequential(transformer_layer(), nn.Linear(512, 3))
        self.rot_head = nn.Sequential(transformer_layer(), nn.Linear(512, rot_dim))

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Both heads' outputs for one batch of crop pairs.

        Args:
            A: (N,c_in,h,w) rendered side, h and w multiples of 8.
            B: (N,c_in,h,w) observed side.

        Returns:
            dict: "trans" (N,3) translation step in radius units, "rot" (N,rot_dim) rotation output
            before tanh scaling (see apply_update), in the network's dtype.

        Raises:
            ValueError: ``A`` is not (N,c_in,h,w).
        """
        if A.ndim != 4 or A.shape[1] != self.c_in:
            raise ValueError(f"A must be (N,{self.c_in},h,w), got {tuple(A.shape)}")
        use_ckpt = checkpointing_active(self.checkpointing, A, self)
        tokens = encode_pair(self.encodeA, self.encodeAB, self.pos_embed, A, B, use_ckpt)
        trans = self.trans_head[1](run_block(self.trans_head[0], tokens, use_ckpt)).mean(dim=1)
        rot = self.rot_head[1](run_block(self.rot_head[0], tokens, use_ckpt)).mean(dim=1)
        return {"trans": trans, "rot": rot}


#: pytorch3d's so3_exp_map clamp of the squared angle, as the upstream refiner update uses it.
UPDATE_EXP_EPS = 1e-4


def rotation_step(rot: torch.Tensor, rot_normalizer: float) -> torch.Tensor:
    """Network rotation output (N,3) -> the camera-frame rotation step dR (N,3,3).

    dR = so3_exp(tanh(rot) * rot_normalizer) transposed (each step at most rot_normalizer
    radians; 0.349 rad = 20 deg in the official configuration), with pytorch3d's angle clamp.

    Args:
        rot: (N,3) network rotation output.
        rot_normalizer: largest step angle in radians.

    Returns:
        (N,3,3) rotations, rot's dtype and device.
    """
    return so3_exp(torch.tanh(rot) * rot_normalizer, eps=UPDATE_EXP_EPS).transpose(1, 2)


def translation_step(trans: torch.Tensor, *, diameter: float, normalize_xyz: bool = True,
                     trans_normalizer=None) -> torch.Tensor:
    """Network translation output (N,3) -> the camera-frame step (N,3) in metres.

    normalize_xyz (the official configuration): trans * diameter/2 (inputs are in units of the
    radius). Otherwise, as upstream: tanh(trans) * trans_normalizer (metres, a scalar or one
    value per axis), so no step exceeds trans_normalizer.

    Args:
        trans: (N,3) network translation output.
        diameter: object diameter in metres.
        normalize_xyz: the config's normalize_xyz (default True).
        trans_normalizer: metres per output unit, a scalar or (3,); needed when normalize_xyz
            is False.

    Returns:
        (N,3) float32 step in metres.

    Raises:
        ValueError: normalize_xyz is False and trans_normalizer is None.
    """
    trans = trans.to(torch.float32)
    if normalize_xyz:
        return trans * (diameter / 2.0)
    if trans_normalizer is None:
        raise ValueError("trans_normalizer is needed when normalize_xyz is false (metres per output unit)")
    scale = torch.as_tensor(trans_normalizer, dtype=torch.float32, device=trans.device).reshape(-1)
    return torch.tanh(trans) * scale


def apply_update(poses: torch.Tensor, trans: torch.Tensor, rot: torch.Tensor, *, diameter: float,
                 rot_normalizer: float = 0.349, normalize_xyz: bool = True,
                 trans_normalizer=None) -> torch.Tensor:
    """New poses (N,4,4) from old poses (N,4,4) and the network's trans (N,3), rot (N,3).

    R_new = dR @ R_old (rotation about the camera axes, see rotation_step), t_new = t_old +
    translation_step(trans). Computed in float32 whatever the network's precision.

    Args:
        poses: (N,4,4) object-in-camera poses, metres.
        trans: (N,3) network translation output.
        rot: (N,3) network rotation output.
        diameter: object diameter in metres.
        rot_normalizer: largest step angle in radians (default 0.349 = 20 deg).
        normalize_xyz: the config's normalize_xyz (default True).
        trans_normalizer: metres per output unit when normalize_xyz is False.

    Returns:
        (N,4,4) float32 new poses.

    Raises:
        ValueError: normalize_xyz is False and trans_normalizer is None.
    """
    poses = poses.to(torch.float32)
    rot = rot.to(torch.float32)
    step = translation_step(trans, diameter=diameter, normalize_xyz=normalize_xyz, trans_normalizer=trans_normalizer)
    dR = rotation_step(rot, rot_normalizer)
    out = poses.clone()
    out[:, :3, :3] = dR @ poses[:, :3, :3]
    out[:, :3, 3] = poses[:, :3, 3] + step
    return out
