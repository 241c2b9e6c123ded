"""What every benchmark report carries: where it ran, with what, and how to run it again."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Machine, library versions and the exact command line of this run."""
    env = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def machine_name(env: dict) -> str:
    """A folder name for benchmarks/results/: the GPU model, or the CPU model and core count."""
    raw = env.get("gpu") or f"cpu-{env['cpu']}-{env['cpu_count']}cores"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def header_lines(env: dict) -> list[str]:
    lines = [f"- machine: `{machine_name(env)}`", f"- cpu: {env['cpu']} ({env['cpu_count']} cores)"]
    if "gpu" in env:
        lines.append(f"- gpu: {env['gpu']} ({env['gpu_memory_gib']} GiB)")
    lines.append(f"- python {env['python']}, torch {env['torch']}, cuda {env['cuda']}")
    lines.append(f"- command: `{env['command']}`")
    return lines


def output_dir(env: dict, override: str | None) -> Path:
    path = Path(override) if override else RESULTS / machine_name(env)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)
