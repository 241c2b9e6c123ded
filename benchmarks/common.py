"""What every benchmark report carries: where it ran, with what, and how to run it again."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
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


def _git_state() -> str | None:
    """The checkout the run measured: commit, plus "+dirty" when the package has local edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "chunkpose", "csrc"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def environment(device: str) -> dict:
    """Machine, library versions and the exact command line of this run."""
    env = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "git": _git_state(),
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
    lines = [f"- machine: `{machine_name(env)}`",
             f"- cpu: {env['cpu']} ({env['cpu_count']} cores, torch threads {env.get('torch_threads', '?')})"]
    if "gpu" in env:
        lines.append(f"- gpu: {env['gpu']} ({env['gpu_memory_gib']} GiB)")
    lines.append(f"- python {env['python']}, torch {env['torch']}, cuda {env['cuda']}")
    lines.append(f"- command: `{env['command']}` (checkout {env.get('git') or 'not recorded'})")
    return lines


def stamp_figure(fig, env: dict) -> None:
    """Machine, versions and the exact command along the bottom edge of a figure."""
    gpu = f", gpu {env['gpu']}" if "gpu" in env else ""
    text = (f"{machine_name(env)}: cpu {env['cpu']} ({env['cpu_count']} cores){gpu}; python {env['python']}, "
            f"torch {env['torch']}, cuda {env['cuda']}\n{env['command']}")
    fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.06)
    fig.text(0.01, 0.005, text, fontsize=6, family="monospace", va="bottom", ha="left", wrap=True)


#: --quick: a small frame, few hypotheses, one iteration, no polish pass.
QUICK = {"width": 256, "height": 192, "hypotheses": 12, "refine_iters": 1, "no_polish": True}


def add_run_args(parser, quick: dict) -> None:
    """Arguments every benchmark takes: the smoke run (``quick``: its settings), device, outputs."""
    shown = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"smoke run in seconds ({shown})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="output folder (default benchmarks/results/<machine>/)")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: redraw the table and plot of a saved run (next to FILE unless --out)")


def add_common_args(parser) -> None:
    """Arguments both pose benchmarks take: size, device, registration settings, outputs."""
    add_run_args(parser, QUICK)
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--height", type=int, default=2048)
    parser.add_argument("--hypotheses", type=int, default=252, help="rotation hypotheses at registration")
    parser.add_argument("--refine-iters", type=int, default=5, help="refiner iterations at registration")
    parser.add_argument("--no-polish", action="store_true",
                        help="skip the geometric refiner's polish pass (3 best poses, 5 more iterations)")


def apply_quick(args, settings: dict | None = None) -> None:
    """With --quick, set the benchmark's smoke-run ``settings`` (default: QUICK) on ``args``."""
    if args.quick:
        for key, value in (QUICK if settings is None else settings).items():
            setattr(args, key, value)


def saved_payload(args) -> dict | None:
    """The raw JSON of an earlier run with ``--from-json``, else None (measure)."""
    return json.loads(Path(args.from_json).read_text()) if args.from_json else None


def measure_and_report(name: str, args, measure, write_reports):
    """Measure (or read the --from-json payload), keep the raw JSON, then draw the reports:
    ``write_reports(payload, folder, stem)``, whose result is returned."""
    payload = saved_payload(args) or measure(args)
    out, stem = destination(name, args, payload["environment"])
    if not args.from_json:
        write_json(out / f"{stem}.json", payload)
    return write_reports(payload, out, stem)


def write_markdown(path: Path, lines: list[str]) -> None:
    text = "\n".join(lines)
    path.write_text(text)
    print(text)


def destination(name: str, args, env: dict) -> tuple[Path, str]:
    """(folder, file stem) for the outputs: next to the --from-json file, or under
    benchmarks/results/<machine>/ (or --out) named after the benchmark (``_quick`` added)."""
    if args.from_json:
        out = Path(args.out or Path(args.from_json).parent)
        out.mkdir(parents=True, exist_ok=True)
        return out, Path(args.from_json).stem
    return output_dir(env, args.out), f"{name}_quick" if args.quick else name


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
