"""The package's layers import only downwards (README: Architecture).

The engine knows nothing of poses, ops know nothing of networks or files, the pipeline
stages do not read files or know the estimator, and nothing but `python -m chunkpose`
imports the command line. A new import that breaks a rule fails here with the module and
the line, instead of growing into a cycle later.
"""
from __future__ import annotations

import ast
from pathlib import Path

import chunkpose

PACKAGE = Path(chunkpose.__file__).parent

COMPILED = {"_C"}  # the csrc extension, built by setup.py
LEAVES = {"errors", "_lazy", "_C", "shapes", "metrics", "vis"}
ALLOWED = {
    "engine": set(),
    "errors": set(),
    "_lazy": set(),
    "shapes": set(),
    "metrics": set(),
    "vis": set(),
    "ops": {"errors", "_C"},
    "models": {"errors", "ops"},
    "io": {"errors", "ops", "vis", "_lazy"},
    "pipeline": {"errors", "engine", "ops", "models"},
    "frame_calls": {"errors", "engine", "ops", "pipeline"},
    "estimator": {"errors", "engine", "ops", "io", "pipeline", "frame_calls"},
    "multi_object": {"errors", "engine", "estimator", "frame_calls", "pipeline"},
    "synth": {"errors", "ops", "io", "shapes"},
    "bop_eval": {"errors", "ops", "io", "metrics", "_lazy"},
    "distributed": {"errors", "io"},
    "training": {"errors", "engine", "ops", "io", "models", "pipeline", "synth", "shapes"},
    "cli": LEAVES | {"engine", "ops", "io", "estimator", "multi_object", "synth", "bop_eval", "distributed", "training", "(root)"},
    "__main__": {"cli"},
    "(root)": {"_lazy"},
}


def _layer(parts: tuple[str, ...]) -> str:
    """('chunkpose', 'ops', 'warp') -> 'ops'; the package's own __init__ -> '(root)'."""
    if len(parts) == 1 or parts[1] == "__init__":
        return "(root)"
    return parts[1]


def _module_of_package_name(name: str) -> str:
    """`from chunkpose import <name>`: the lazily exported name's module, a submodule, or the
    package itself (for __version__)."""
    if name in chunkpose._EXPORTS:
        return chunkpose._EXPORTS[name]
    if name in COMPILED or (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists():
        return f"chunkpose.{name}"
    return "chunkpose"


def _imported_modules(path: Path, parts: tuple[str, ...]):
    """(line, 'chunkpose.x.y') for every chunkpose import in the file, top level or not."""
    package = list(parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "chunkpose":
                for alias in node.names:
                    yield node.lineno, _module_of_package_name(alias.name)
            else:
                yield node.lineno, module


def _violations(package: Path = PACKAGE):
    found = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        layer = _layer(parts)
        allowed = ALLOWED.get(layer)
        if allowed is None:
            found.append(f"{path}: layer {layer!r} has no rule in tests/test_layering.py; add one")
            continue
        for line, module in _imported_modules(path, parts):
            if not module.startswith("chunkpose"):
                continue
            target = _layer(tuple(module.split(".")))
            if target != layer and target not in allowed:
                found.append(f"{path.relative_to(package.parent)}:{line}: {layer} imports {module}")
    return found


def test_layers_import_only_downwards():
    assert _violations() == []


def test_the_checker_catches_relative_lazy_and_nested_imports(tmp_path):
    package = tmp_path / "chunkpose"
    (package / "pipeline").mkdir(parents=True)
    (package / "ops").mkdir()
    (package / "pipeline" / "probe.py").write_text(
        "from ..estimator import PoseEstimator\n"
        "def later():\n    from chunkpose import finetune\n"
    )
    (package / "ops" / "probe.py").write_text("import chunkpose.io.mesh\nfrom . import warp\n")
    found = _violations(package)
    assert any("pipeline/probe.py:1: pipeline imports chunkpose.estimator" in v for v in found)
    assert any("pipeline/probe.py:3: pipeline imports chunkpose.training" in v for v in found)
    assert any("ops/probe.py:1: ops imports chunkpose.io.mesh" in v for v in found)
    assert len(found) == 3
