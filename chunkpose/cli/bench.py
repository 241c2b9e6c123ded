"""``chunkpose bench NAME [ARGS...]``: run benchmarks/NAME.py (a source checkout's)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chunkpose.cli.parser import UserError
from chunkpose.cli.summary import EXIT_OK

#: Helpers and examples in benchmarks/ that are not benchmarks to list.
NOT_BENCHMARKS = ("common", "engine_demo")


def benchmark_scripts(bench: Path) -> dict:
    """name -> script for the runnable benchmarks (benchmarks/<name>.py, helpers excluded)."""
    if not bench.is_dir():
        return {}
    return {p.stem: p for p in sorted(bench.glob("*.py")) if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS}


def run_bench(bench_args) -> int:
    """``chunkpose bench NAME [ARGS...]`` runs benchmarks/NAME.py ARGS; ``all`` runs each in
    turn; no name lists them. Needs a source checkout (benchmarks/ is not installed)."""
    root = Path(__file__).resolve().parents[2]
    scripts = benchmark_scripts(root / "benchmarks")
    if not scripts:
        raise UserError(f"no benchmarks in {root / 'benchmarks'} (chunkpose bench needs a source checkout)")
    forwarded = list(bench_args or [])
    if not forwarded or forwarded[0] in ("-h", "--help"):
        print("usage: chunkpose bench {" + ",".join([*scripts, "all"]) + "} [ARGS...]")
        print("runs benchmarks/NAME.py with ARGS (e.g. --quick); 'all' runs each of them")
        return EXIT_OK
    name, rest = forwarded[0], forwarded[1:]
    if name == "all":
        chosen = list(scripts.values())
    elif name in scripts:
        chosen = [scripts[name]]
    else:
        raise UserError(f"unknown benchmark {name!r} (choose one of: {', '.join(scripts)}, all)")
    for script in chosen:
        rc = subprocess.call([sys.executable, str(script), *rest], cwd=str(root))
        if rc != 0:
            return rc
    return EXIT_OK
