"""Building blocks shared by RefineNet and ScoreNetMultiPair.

Module and parameter names follow the layout of FoundationPose's state dicts (upstream's
learning/models/network_modules.py, refine_network.py and score_network.py), so the
official checkpoints load with strict key checking: ConvBNReLU keeps its layers in a Sequential called `net` (conv at `.net.0`, norm
at `.net.1`), ResnetBasicBlock has conv1/bn1/conv2/bn2, and the positional table is a
buffer called `pe`.

Gradient checkpointing lives here too: `run_block` runs one block either directly or under
torch.utils.checkpoint (non-reentrant), so that in training only block inputs stay alive
and the insides are recomputed in backward.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def make_norm(channels: int, use_bn: bool) -> nn.Module:
    """BatchNorm2d, or Identity when a config says use_BN: false (keeps Sequential indices)."""
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class ConvBNReLU(nn.Module):
    """conv (k x k, stride s, padding (k-1)//2, bias) -> BatchNorm2d -> ReLU, as `.net`.

    x (B,c_in,h,w) -> (B,c_out,ceil(h/s),ceil(w/s)).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, use_bn: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=True),
            make_norm(c_out, use_bn),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResnetBasicBlock(nn.Module):
    """Two 3x3 convs (with bias) and norms with an identity shortcut: x (B,c,h,w) -> (B,c,h,w)."""

    def __init__(self, channels: int, use_bn: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.bn1 = make_norm(channels, use_bn)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.bn2 = make_norm(channels, use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + x)


def sinusoid_table(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed transformer table (max_len, d_model): sin on even channels, cos on odd, base 10000."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class PositionalEmbedding(nn.Module):
    """Adds the fixed sinusoidal table to tokens: x (B,N,d) -> x + pe[:, :N], N <= max_len,
    in the table's dtype (float32) whatever x's (fp16 under autocast).

    `pe` (1,max_len,d) is a persistent buffer because the upstream checkpoints contain it
    (as `pos_embed.pe`); loading overwrites it with the stored (identical) table.
    """

    def __init__(self, d_model: int = 512, max_len: int = 400):
        super().__init__()
        self.register_buffer("pe", sinusoid_table(max_len, d_model)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(
                f"PositionalEmbedding: {x.shape[1]} tokens but the table has {self.pe.shape[1]}; "
                "use a smaller input_resize (160 gives 20x20 = 400 tokens)"
            )
        # No cast: under fp16 autocast the sum promotes to the table's float32, as upstream's
        # does, so the transformers' residual stream stays float32.
        return x + self.pe[:, : x.shape[1]]


# --- gradient checkpointing ---------------------------------------------------------------

def checkpointing_active(flag: Optional[bool], x: torch.Tensor, module: nn.Module) -> bool:
    """Whether blocks should run under torch.utils.checkpoint now.

    flag True/False forces it; None (the default) means: on exactly when a backward pass can
    follow (grad mode on and the input or some parameter requires grad).
    """
    if flag is not None:
        return bool(flag) and torch.is_grad_enabled()
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    return any(p.requires_grad for p in module.parameters())


class _FrozenNormStats:
    """Restores BatchNorm running statistics after a checkpoint recomputation.

    A recomputed forward of a train-mode BatchNorm would update running_mean/var a second
    time; saving and restoring them around the recomputation keeps training identical to a
    run without checkpointing.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        self.saved = []

    def __enter__(self):
        self.saved = [
            (m, m.running_mean.clone() if m.running_mean is not None else None,
             m.running_var.clone() if m.running_var is not None else None,
             m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            for m in self.norms
        ]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, mean, var, count in self.saved:
                if mean is not None:
                    m.running_mean.copy_(mean)
                if var is not None:
                    m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)
        self.saved = []
        return False


def run_block(block, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """block(x), under non-reentrant gradient checkpointing when `use_checkpoint`.

    `block` is a module or any callable of one tensor (e.g. a self-attention wrapper).

    RNG state is preserved (dropout masks repeat in the recomputation) and train-mode
    BatchNorm statistics are updated once, so results and gradients match the plain call.
    """
    if not use_checkpoint:
        return block(x)
    modules = block.modules() if isinstance(block, nn.Module) else ()
    has_train_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in modules)
    if has_train_norm:
        context_fn = lambda: (nullcontext(), _FrozenNormStats(block))  # noqa: E731
    else:
        context_fn = lambda: (nullcontext(), nullcontext())  # noqa: E731
    return checkpoint(block, x, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn)


def run_sequence(blocks: nn.Sequential, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Apply each block of `blocks` in turn (each its own checkpoint segment)."""
    for block in blocks:
        x = run_block(block, x, use_checkpoint)
    return x


def encoder_a(c_in: int, use_bn: bool = True) -> nn.Sequential:
    """The per-side encoder: (N,c_in,160,160) -> (N,128,40,40)."""
    return nn.Sequential(
        ConvBNReLU(c_in, 64, kernel_size=7, stride=2, use_bn=use_bn),
        ConvBNReLU(64, 128, kernel_size=3, stride=2, use_bn=use_bn),
        ResnetBasicBlock(128, use_bn=use_bn),
        ResnetBasicBlock(128, use_bn=use_bn),
    )


def encoder_ab(use_bn: bool = True) -> nn.Sequential:
    """The joint encoder on concatenated sides: (N,256,40,40) -> (N,512,20,20)."""
    return nn.Sequential(
        ResnetBasicBlock(256, use_bn=use_bn),
        ResnetBasicBlock(256, use_bn=use_bn),
        ConvBNReLU(256, 512, kernel_size=3, stride=2, use_bn=use_bn),
        ResnetBasicBlock(512, use_bn=use_bn),
        ResnetBasicBlock(512, use_bn=use_bn),
    )


def encode_pair(encode_a: nn.Sequential, encode_ab: nn.Sequential, pos_embed: PositionalEmbedding,
                A: torch.Tensor, B: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Shared trunk: A, B (N,c_in,h,w) -> tokens (N, h/8 * w/8, 512) with positions added.

    Both sides go through encode_a as one batch (as upstream, so train-mode BatchNorm sees
    both), their features are concatenated on channels, then encode_ab.
    """
    if A.shape != B.shape:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must have the same shape (N,C,h,w)")
    n = A.shape[0]
    x = run_sequence(encode_a, torch.cat([A, B], dim=0), use_checkpoint)
    x = torch.cat([x[:n], x[n:]], dim=1)
    x = run_sequence(encode_ab, x, use_checkpoint)
    tokens = x.flatten(2).transpose(1, 2)  # (N, h*w, C)
    return pos_embed(tokens)
