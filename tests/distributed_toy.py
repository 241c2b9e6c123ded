"""A toy dataset-parallel run for tests/test_distributed.py (not collected by pytest).

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/distributed_toy.py --out DIR --count-dir DIR

Each unit writes a small file derived from its id, sleeps a little (unevenly, so claiming is
really dynamic) and logs one line per attempt to <count-dir>/runs.log, so a test can count how
often each unit's process ran. --fail makes one unit raise; --kill makes the process die
(os._exit) in the middle of one unit the first time only (a marker file remembers it).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from chunkpose.distributed import copy_unit_files, run_units


def toy_units(n: int) -> list[str]:
    # ids with a folder-like part, as BOP image ids ("scene/image") will look
    return [f"{i // 4:06d}/{i % 4:06d}" for i in range(n)]


def toy_value(unit: str) -> int:
    return int(hashlib.sha1(unit.encode()).hexdigest()[:6], 16)


def make_process(log_dir, fail=None, kill=None, marker=None, slow_rank=None, sleep_s=0.02):
    log_dir = Path(log_dir)

    def process(unit, scratch, device):
        rank = int(os.environ.get("RANK", "0"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        line = f"{unit} {rank} {attempt} {os.getpid()}\n"
        with open(log_dir / "runs.log", "a") as f:  # one short O_APPEND write per attempt
            f.write(line)
        (scratch / "poses").mkdir()
        (scratch / "poses" / f"{unit.replace('/', '_')}.txt").write_text(f"{unit} {toy_value(unit)}\n")
        if kill is not None and unit == kill and not Path(marker).exists():
            Path(marker).write_text("killed once\n")
            os._exit(3)  # dies mid-unit: scratch half written, no record
        if fail is not None and unit == fail:
            raise ValueError(f"bad image {unit}")
        pause = sleep_s * (1 + toy_value(unit) % 3)
        if slow_rank is not None and rank == slow_rank:
            pause *= 8
        time.sleep(pause)
        return {"value": toy_value(unit), "peak_bytes": 1000 + toy_value(unit) % 1000}

    return process


def toy_merge(records, final_dir, summary):
    with open(final_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["unit", "status", "value", "error_type", "error"])
        for r in records:
            error = r["error"] or {}
            w.writerow([r["unit"], r["status"], (r["result"] or {}).get("value", ""), error.get("type", ""),
                        error.get("message", "")])
            copy_unit_files(r, final_dir)
    report = {"units": [r["unit"] for r in records], "distributed": summary}
    (final_dir / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--count-dir", required=True)  # not --log: torchrun would take it for --log-dir
    p.add_argument("--units", type=int, default=12)
    p.add_argument("--fail")
    p.add_argument("--kill")
    p.add_argument("--marker")
    p.add_argument("--slow-rank", type=int)
    args = p.parse_args(argv)
    process = make_process(args.count_dir, fail=args.fail, kill=args.kill, marker=args.marker, slow_rank=args.slow_rank)
    summary = run_units(toy_units(args.units), process, toy_merge, args.out, run_key={"toy": 1}, timeout_s=120)
    rank = int(os.environ.get("RANK", "0"))
    (Path(args.count_dir) / f"summary-rank{rank}-attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.json").write_text(
        json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
