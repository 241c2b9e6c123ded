"""Loading (and writing) FoundationPose-layout checkpoints.

Layout the official weights come in (users download them; they are not redistributable):

    weights/
      2023-10-28-18-33-37/   model_best.pth  config.yml    <- refiner (RefineNet)
      2024-01-11-20-02-45/   model_best.pth  config.yml    <- scorer (ScoreNetMultiPair)

`load_weights(path)` accepts that `weights` folder, its parent, either run folder (or its
model_best.pth: the other run is looked for beside it), or any folder whose sub-folders
hold one refiner and one scorer model_best.pth
(which one is the refiner is read from the state dict's keys, then the config, then the
known run names). The .pth is {'model': state_dict} or a plain state dict; 'module.'
prefixes (DataParallel) are stripped; keys are checked strictly.

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import copy
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import yaml
from torch import nn

from chunkpose.errors import InputError
from chunkpose.models.refine_net import RefineNet
from chunkpose.models.score_net import ScoreNetMultiPair

REFINER_RUN = "2023-10-28-18-33-37"
SCORER_RUN = "2024-01-11-20-02-45"
WEIGHTS_FILE = "model_best.pth"
CONFIG_FILE = "config.yml"

# The official runs' configuration (what `make_config(kind)` gives without a config, and what
# save_network writes, updated with its overrides).
OFFICIAL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "refiner": {
        "c_in": 6,
        "crop_ratio": 1.2,
        "input_resize": [160, 160],
        "normalize_xyz": True,
        "rot_normalizer": 0.3490658503988659,  # 20 degrees
        "trans_normalizer": None,  # metres per unit of output; used only when normalize_xyz is false
        "rot_rep": "axis_angle",
        "trans_rep": "tracknet",
        "use_BN": True,
    },
    "scorer": {
        "c_in": 6,
        "crop_ratio": 1.1,
        "input_resize": [160, 160],
        "normalize_xyz": True,
        "use_BN": True,
    },
}
# Upstream's backward-compatibility defaults for keys a run's config.yml does not set (its
# refine and score predictors fill these in before building the networks).
MISSING_KEY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "refiner": {"use_BN": False, "c_in": 4, "crop_ratio": 1.2, "trans_rep": "tracknet", "rot_rep": "axis_angle",
                "zfar": 3.0, "normalize_xyz": False},
    "scorer": {"use_BN": False, "c_in": 4, "crop_ratio": 1.2, "zfar": float("inf"), "normalize_xyz": False},
}
# Keys upstream reads without a default: a config.yml without them takes the official value.
OFFICIAL_FILL_INS = ("input_resize", "rot_normalizer", "trans_normalizer")
# Backwards-compatible names.
REFINER_DEFAULTS = OFFICIAL_CONFIGS["refiner"]
SCORER_DEFAULTS = OFFICIAL_CONFIGS["scorer"]


def official_config(kind: str, **overrides: Any) -> Dict[str, Any]:
    """The official run's configuration of ``kind`` ("refiner" or "scorer"), updated with
    ``overrides`` (e.g. input_resize=[32, 32] for small test crops).

    Args:
        kind: "refiner" or "scorer".
        **overrides: config keys to set.

    Returns:
        dict: a deep copy of OFFICIAL_CONFIGS[kind] with the overrides.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in OFFICIAL_CONFIGS:
        raise ValueError(f"kind: expected 'refiner' or 'scorer', got {kind!r}")
    values = copy.deepcopy(OFFICIAL_CONFIGS[kind])
    values.update(overrides)
    return values


LAYOUT_HELP = (
    "Expected a folder holding the two FoundationPose run folders, e.g. weights/"
    f"{REFINER_RUN}/{{{WEIGHTS_FILE},{CONFIG_FILE}}} (refiner) and weights/{SCORER_RUN}/"
    f"{{{WEIGHTS_FILE},{CONFIG_FILE}}} (scorer); any two sub-folders with a {WEIGHTS_FILE} "
    "(and optionally a config.yml) work."
)


class CheckpointError(InputError):
    """A weights folder or file that cannot be used; the message says what is expected."""


@dataclass
class NetworkConfig:
    """The config.yml of one run merged over the defaults; ``raw`` keeps the file's own keys.

    Indexing (``cfg["crop_ratio"]``) reads ``values``.

    Attributes:
        kind: "refiner" or "scorer".
        values: dict of the settings the network runs with.
        raw: dict of the file's own keys ({} when there was no file).
        source: the config.yml path, or None.
        crop_size: (property) the square input_resize side in pixels (CheckpointError when it is
            not square, not a multiple of 8 or above 160).
    """

    kind: str  # "refiner" | "scorer"
    values: Dict[str, Any]
    raw: Dict[str, Any] = field(default_factory=dict)
    source: Optional[Path] = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``values[key]``, or ``default`` when the key is not set.

        Args:
            key: a config key.
            default: returned when absent (default None).

        Returns:
            The value.
        """
        return self.values.get(key, default)

    @property
    def crop_size(self) -> int:
        size = self.values.get("input_resize", [160, 160])
        if isinstance(size, (int, float)):
            return int(size)
        size = [int(s) for s in size]
        if len(size) != 2 or size[0] != size[1]:
            raise CheckpointError(f"{self.source}: input_resize {size} must be square, e.g. [160, 160]")
        if size[0] % 8 or (size[0] // 8) ** 2 > 400:
            raise CheckpointError(f"{self.source}: input_resize {size[0]} must be a multiple of 8 and at most 160")
        return size[0]


def make_config(kind: str, raw: Optional[Dict[str, Any]] = None, source: Optional[Path] = None) -> NetworkConfig:
    """The configuration a run of ``kind`` ("refiner" or "scorer") runs with.

    raw None (no config at all): the official run's values. A config (a config.yml's contents
    or a dict): its keys, and for keys it does not set upstream's backward-compatibility
    defaults (MISSING_KEY_DEFAULTS: use_BN False, c_in 4, normalize_xyz False, crop_ratio 1.2,
    zfar 3 for the refiner and inf for the scorer), then the official values of the keys
    upstream has no default for (input_resize, rot_normalizer, trans_normalizer).

    Args:
        kind: "refiner" or "scorer".
        raw: a config dict, or None for the official run's values.
        source: the config file, for messages (optional).

    Returns:
        NetworkConfig.

    Raises:
        ValueError: an unknown ``kind``.
        CheckpointError: (an InputError) unsupported rot_rep / trans_rep, normalize_xyz false
            without trans_normalizer, or an unusable input_resize.
    """
    if kind not in OFFICIAL_CONFIGS:
        raise ValueError(f"kind: expected 'refiner' or 'scorer', got {kind!r}")
    if raw is None:
        values, raw = official_config(kind), {}
    else:
        raw = dict(raw)
        values = {key: OFFICIAL_CONFIGS[kind][key] for key in OFFICIAL_FILL_INS if key in OFFICIAL_CONFIGS[kind]}
        values.update(copy.deepcopy(MISSING_KEY_DEFAULTS[kind]))
        values.update(raw)
        if values.get("crop_ratio") is None:  # upstream treats a null crop_ratio as missing
            values["crop_ratio"] = MISSING_KEY_DEFAULTS[kind]["crop_ratio"]
    if isinstance(values.get("zfar"), str) and "inf" in values["zfar"].lower():
        values["zfar"] = float("inf")
    cfg = NetworkConfig(kind=kind, values=values, raw=raw, source=source)
    if kind == "refiner":
        if str(values["rot_rep"]) != "axis_angle":
            raise CheckpointError(f"{source}: rot_rep {values['rot_rep']!r} is not supported (only 'axis_angle')")
        if str(values["trans_rep"]) != "tracknet":
            raise CheckpointError(f"{source}: trans_rep {values['trans_rep']!r} is not supported (only 'tracknet')")
        if not values["normalize_xyz"] and values.get("trans_normalizer") is None:
            raise CheckpointError(f"{source}: normalize_xyz is false, so trans_normalizer must be set")
    cfg.crop_size  # validates input_resize
    return cfg


# --- reading config.yml -------------------------------------------------------------------

class _LenientLoader(yaml.SafeLoader):
    """safe_load that turns python-specific tags (tuples, numpy scalars...) into plain data."""


def _construct_any(loader, tag_suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_LenientLoader.add_multi_constructor("", _construct_any)


def read_config(path: Union[str, Path]) -> Dict[str, Any]:
    """config.yml -> dict (empty if the file is missing or empty).

    Python-specific YAML tags (tuples, numpy scalars...) are read as plain data.

    Args:
        path: the config.yml file.

    Returns:
        dict of settings.

    Raises:
        CheckpointError: the file holds something other than a mapping.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, "r") as f:
        data = yaml.load(f, Loader=_LenientLoader)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


# --- reading model_best.pth ---------------------------------------------------------------

def read_state_dict(path: Union[str, Path], allow_pickle: bool = True) -> Dict[str, torch.Tensor]:
    """model_best.pth -> a plain state dict on the CPU ('model' key unwrapped, 'module.' stripped).

    Loads with weights_only=True; a file that needs full unpickling is loaded that way only
    when allow_pickle (with a warning: only do this for files from a source you trust).

    Args:
        path: the .pth file.
        allow_pickle: allow the full-unpickling fallback (default True).

    Returns:
        dict of key -> CPU tensor.

    Raises:
        CheckpointError: the file is missing, cannot be loaded, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found. {LAYOUT_HELP}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        if not allow_pickle:
            raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({err})") from None
        warnings.warn(f"{path}: not loadable with weights_only=True; unpickling it fully (trust its source)")
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a state dict (or a dict with key 'model' holding one), got {type(obj).__name__}"
        )
    out = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def kind_of_state_dict(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """'refiner' for RefineNet keys (encodeA.*), 'scorer' for ScoreNetMultiPair keys (encoderA.*).

    Args:
        state: a state dict.

    Returns:
        "refiner", "scorer" or None when the keys tell neither.
    """
    if any(k.startswith("encodeA.") for k in state) or any(k.startswith("trans_head.") for k in state):
        return "refiner"
    if any(k.startswith("encoderA.") for k in state) or any(k.startswith("att_cross.") for k in state):
        return "scorer"
    return None


def kind_of_config(cfg: Dict[str, Any]) -> Optional[str]:
    """Guess refiner/scorer from a config dict (used when the state dict does not tell).

    Args:
        cfg: a config dict (names such as exp_name, and refiner-only keys, are looked at).

    Returns:
        "refiner", "scorer" or None.
    """
    text = " ".join(str(cfg.get(k, "")) for k in ("exp_name", "model_name", "model", "name", "task")).lower()
    if "score" in text:
        return "scorer"
    if "refine" in text or "track" in text:
        return "refiner"
    if "rot_rep" in cfg or "trans_rep" in cfg or "rot_normalizer" in cfg:
        return "refiner"
    return None


# --- building the modules -----------------------------------------------------------------

def build_network(cfg: NetworkConfig) -> nn.Module:
    """An untrained RefineNet or ScoreNetMultiPair shaped by the config (c_in, use_BN).

    Args:
        cfg: a NetworkConfig.

    Returns:
        nn.Module (RefineNet for kind "refiner", else ScoreNetMultiPair) on the CPU.
    """
    c_in = int(cfg["c_in"])
    use_bn = bool(cfg["use_BN"])
    if cfg.kind == "refiner":
        return RefineNet(c_in=c_in, use_bn=use_bn)
    return ScoreNetMultiPair(c_in=c_in, use_bn=use_bn)


def load_state_strict(model: nn.Module, state: Dict[str, torch.Tensor], source: Union[str, Path], kind: str) -> None:
    """load_state_dict(strict) with one clear message naming every missing/unexpected/mis-shaped key.

    Args:
        model: the network to load into.
        state: the state dict.
        source: the file it came from, for the message.
        kind: "refiner" or "scorer", for the message.

    Raises:
        CheckpointError: any key is missing, unexpected or of another shape.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        def listing(items: List[str]) -> str:
            shown = ", ".join(items[:12])
            return shown + (f", ... ({len(items)} in all)" if len(items) > 12 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {listing(mismatched)}")
        net = "RefineNet (keys encodeA.*, encodeAB.*, trans_head.*, rot_head.*)" if kind == "refiner" else \
            "ScoreNetMultiPair (keys encoderA.*, encoderAB.*, att.*, att_cross.*, linear.*)"
        raise CheckpointError(
            f"{source}: does not match the {kind} network {net}; " + "; ".join(parts) + f". {LAYOUT_HELP}"
        )
    model.load_state_dict(state, strict=True)


@dataclass
class RunFolder:
    """One run folder's contents.

    Attributes:
        path: the run folder.
        state: its state dict.
        config: its config.yml as a dict.
        kind: "refiner", "scorer" or None.
    """
    path: Path
    state: Dict[str, torch.Tensor]
    config: Dict[str, Any]
    kind: Optional[str]


def _candidate_roots(path: Path) -> List[Path]:
    """Folders that may hold the two runs: path, path/weights, and, when path is itself a
    run folder, its parent."""
    roots = [path]
    for name in ("weights", "foundationpose_weights"):
        if (path / name).is_dir():
            roots.append(path / name)
    if (path / WEIGHTS_FILE).is_file():
        roots.append(path.parent)
    return roots


def find_run_folders(path: Union[str, Path]) -> Dict[str, Path]:
    """{'refiner': run folder, 'scorer': run folder} under ``path`` (see the module docstring).

    Args:
        path: a weights folder, its parent, a run folder or a run's model_best.pth (``~`` is
            expanded).

    Returns:
        dict with keys "refiner" and "scorer", each a Path.

    Raises:
        CheckpointError: ``path`` is not a folder, no refiner + scorer pair is found, or there are
            several runs of one kind.
    """
    path = Path(os.path.expanduser(str(path)))
    if path.is_file() and path.name == WEIGHTS_FILE:  # a run's model_best.pth: look beside its run
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"weights={path}: not a folder. {LAYOUT_HELP}")
    # 1. the official run names
    for root in _candidate_roots(path):
        if (root / REFINER_RUN / WEIGHTS_FILE).is_file() and (root / SCORER_RUN / WEIGHTS_FILE).is_file():
            return {"refiner": root / REFINER_RUN, "scorer": root / SCORER_RUN}
    # 2. any sub-folders with a model_best.pth, told apart by their keys / configs
    for root in _candidate_roots(path):
        runs = sorted(p for p in root.iterdir() if p.is_dir() and (p / WEIGHTS_FILE).is_file())
        if len(runs) < 2:
            continue
        found: Dict[str, List[Path]] = {"refiner": [], "scorer": []}
        unknown = []
        for run in runs:
            kind = kind_of_state_dict(read_state_dict(run / WEIGHTS_FILE)) or kind_of_config(read_config(run / CONFIG_FILE))
            if kind is None and run.name in (REFINER_RUN, SCORER_RUN):
                kind = "refiner" if run.name == REFINER_RUN else "scorer"
            (found[kind] if kind else unknown).append(run)
        if found["refiner"] and found["scorer"]:
            for kind, runs_of_kind in found.items():
                if len(runs_of_kind) > 1:
                    raise CheckpointError(
                        f"weights={root}: several {kind} runs ({', '.join(p.name for p in runs_of_kind)}); "
                        "point weights= at a folder holding exactly one refiner and one scorer run"
                    )
            return {"refiner": found["refiner"][0], "scorer": found["scorer"][0]}
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"weights={path}: found no refiner + scorer pair (contents: {present[:20]}). {LAYOUT_HELP}"
    )


def load_network(run_dir: Union[str, Path], kind: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                 allow_pickle: bool = True) -> Tuple[nn.Module, NetworkConfig]:
    """One run folder (model_best.pth + config.yml) -> (network in eval mode on ``device``, config).

    The config is make_config of config.yml (upstream's defaults for missing keys); a run folder
    without config.yml takes the official configuration, with a warning.

    Args:
        run_dir: the run folder.
        kind: "refiner", "scorer", or None to tell from the state dict / config.
        device: where the network goes (default "cpu").
        allow_pickle: see read_state_dict (default True).

    Returns:
        (nn.Module in eval mode, NetworkConfig).

    Raises:
        CheckpointError: the weights or config cannot be used, or the kind cannot be told.
    """
    run_dir = Path(run_dir)
    state = read_state_dict(run_dir / WEIGHTS_FILE, allow_pickle=allow_pickle)
    raw = read_config(run_dir / CONFIG_FILE)
    kind = kind or kind_of_state_dict(state) or kind_of_config(raw)
    if kind not in ("refiner", "scorer"):
        raise CheckpointError(f"{run_dir}: cannot tell whether this is the refiner or the scorer. {LAYOUT_HELP}")
    if not (run_dir / CONFIG_FILE).is_file():
        # Upstream cannot run without it; the official configuration is the best guess.
        warnings.warn(f"{run_dir}: no {CONFIG_FILE}; using the official {kind} run's configuration")
        raw = None
    cfg = make_config(kind, raw, source=run_dir / CONFIG_FILE)
    model = build_network(cfg)
    load_state_strict(model, state, run_dir / WEIGHTS_FILE, kind)
    return model.to(device).eval(), cfg


def load_weights(path: Union[str, Path], device: Union[str, torch.device] = "cpu", allow_pickle: bool = True
                 ) -> Tuple[RefineNet, ScoreNetMultiPair, Dict[str, NetworkConfig]]:
    """A weights folder -> (RefineNet, ScoreNetMultiPair, {'refiner': cfg, 'scorer': cfg}), eval mode.

    Args:
        path: anything find_run_folders accepts.
        device: where the networks go (default "cpu").
        allow_pickle: see read_state_dict (default True).

    Returns:
        (RefineNet, ScoreNetMultiPair, dict of NetworkConfig by kind).

    Raises:
        CheckpointError: the folder, a weights file or a config cannot be used.
    """
    runs = find_run_folders(path)
    refiner, rcfg = load_network(runs["refiner"], "refiner", device, allow_pickle)
    scorer, scfg = load_network(runs["scorer"], "scorer", device, allow_pickle)
    return refiner, scorer, {"refiner": rcfg, "scorer": scfg}


def save_network(run_dir: Union[str, Path], model: nn.Module, config: Optional[Dict[str, Any]] = None) -> Path:
    """Write model_best.pth ({'model': state_dict}) and a complete config.yml in the upstream
    layout: the official run's configuration updated with ``config``.

    Args:
        run_dir: the run folder (created if needed).
        model: a RefineNet (kind refiner) or anything else (kind scorer).
        config: a dict of overrides or a NetworkConfig (its values), or None.

    Returns:
        Path of the run folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    kind = "refiner" if isinstance(model, RefineNet) else "scorer"
    if isinstance(config, NetworkConfig):
        config = config.values
    config = official_config(kind, **dict(config or {}))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    config = {k: v for k, v in config.items() if v is not None}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": state}, run_dir / WEIGHTS_FILE)
    with open(run_dir / CONFIG_FILE, "w") as f:
        yaml.safe_dump(dict(config), f)
    return run_dir


def save_weights(path: Union[str, Path], refiner: RefineNet, scorer: ScoreNetMultiPair,
                 refiner_config: Optional[Dict[str, Any]] = None, scorer_config: Optional[Dict[str, Any]] = None) -> Path:
    """Write both networks as path/<refiner run>/ and path/<scorer run>/ (the official names).

    Args:
        path: the weights folder (created if needed).
        refiner: the RefineNet.
        scorer: the ScoreNetMultiPair.
        refiner_config: overrides of the refiner's config (see save_network), or None.
        scorer_config: overrides of the scorer's config, or None.

    Returns:
        Path of the weights folder.
    """
    path = Path(path)
    save_network(path / REFINER_RUN, refiner, refiner_config)
    save_network(path / SCORER_RUN, scorer, scorer_config)
    return path
