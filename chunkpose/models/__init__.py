"""FoundationPose-compatible networks (upstream parameter names) and their checkpoint loader."""
from chunkpose.models.checkpoint import (
    CheckpointError,
    NetworkConfig,
    load_network,
    load_weights,
    make_config,
    official_config,
    save_network,
    save_weights,
)
from chunkpose.models.refine_net import RefineNet, apply_update, rotation_step, translation_step
from chunkpose.models.score_net import ScoreNetMultiPair

__all__ = [
    "CheckpointError",
    "NetworkConfig",
    "RefineNet",
    "ScoreNetMultiPair",
    "apply_update",
    "load_network",
    "load_weights",
    "make_config",
    "official_config",
    "rotation_step",
    "save_network",
    "save_weights",
    "translation_step",
]
