"""ScoreNetMultiPair: FoundationPose's hypothesis scorer, with upstream parameter names.

Everything up to the per-hypothesis feature (trunk, self-attention over the crop's tokens,
mean over tokens) is independent per hypothesis and can run in any chunks; only
`att_cross` (attention across the L hypotheses) and the final linear need them all. The
forward is therefore split into `features` (per hypothesis, chunkable) and `cross`
(once, on the gathered (L,512) features).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from chunkpose.models.blocks import (
    PositionalEmbedding,
    checkpointing_active,
    encode_pair,
    encoder_a,
    encoder_ab,
    run_block,
)


class ScoreNetMultiPair(nn.Module):
    """encoderA / encoderAB trunk, pos_embed, att (over tokens), att_cross (over hypotheses), linear.

    features(A (N,c_in,h,w), B (N,c_in,h,w)) -> (N,512)
    cross(features (L,512) or (G,L,512)) -> score logits (L,) or (G,L)
    forward(A, B, L=None) -> logits (N/L, L) (L = N by default: all hypotheses compared together)
    """

    def __init__(self, c_in: int = 6, use_bn: bool = True, checkpointing: Optional[bool] = None):
        super().__init__()
        self.c_in = c_in
        self.checkpointing = checkpointing
        self.encoderA = encoder_a(c_in, use_bn)
        self.encoderAB = encoder_ab(use_bn)
        self.pos_embed = PositionalEmbedding(d_model=512, max_len=400)
        self.att = nn.MultiheadAttention(512, 4, batch_first=True)
        self.att_cross = nn.MultiheadAttention(512, 4, batch_first=True)
        self.linear = nn.Linear(512, 1)

    def _self_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.att(tokens, tokens, tokens, need_weights=False)[0]

    def features(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Per-hypothesis features (N,512): trunk, self-attention over tokens, token mean."""
        if A.ndim != 4 or A.shape[1] != self.c_in:
            raise ValueError(f"A must be (N,{self.c_in},h,w), got {tuple(A.shape)}")
        use_ckpt = checkpointing_active(self.checkpointing, A, self)
        tokens = encode_pair(self.encoderA, self.encoderAB, self.pos_embed, A, B, use_ckpt)
        tokens = run_block(self._self_attention, tokens, use_ckpt)
        return tokens.mean(dim=1)

    def cross(self, features: torch.Tensor) -> torch.Tensor:
        """Score logits from gathered features: (L,512) -> (L,), or (G,L,512) -> (G,L)."""
        single = features.ndim == 2
        f = features[None] if single else features
        if f.ndim != 3 or f.shape[-1] != 512:
            raise ValueError(f"features must be (L,512) or (G,L,512), got {tuple(features.shape)}")
        f = self.att_cross(f, f, f, need_weights=False)[0]
        logits = self.linear(f)[..., 0]
        return logits[0] if single else logits

    def forward(self, A: torch.Tensor, B: torch.Tensor, L: Optional[int] = None) -> torch.Tensor:
        n = A.shape[0]
        L = n if L is None else int(L)
        if L <= 0 or n % L:
            raise ValueError(f"L={L} must divide the number of pairs {n}")
        feats = self.features(A, B)
        return self.cross(feats.reshape(n // L, L, -1))
