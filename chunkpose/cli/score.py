"""``chunkpose eval --bop DATASET --results CSV``: BOP19's scores of a results file.

Everything is computed before anything is written; then bop_eval.json and bop_recall.png
go next to the results file (or into ``--out``), each through a temporary name, so a
failed evaluation leaves no half-written output.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from chunkpose.cli import calls
from chunkpose.cli.parser import UserError
from chunkpose.cli.summary import EXIT_OK

EVAL_JSON = "bop_eval.json"
EVAL_PLOT = "bop_recall.png"


def _write_json_atomically(path: Path, data) -> None:
    from chunkpose.io.results import to_jsonable

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def run_eval(args) -> int:
    from chunkpose.bop_eval import evaluate, format_table, plot
    from chunkpose.io.bop_results import check_bop_results, split_folder
    from chunkpose.io.results import to_jsonable

    if not Path(args.results).is_file():
        raise UserError(f"results file {args.results} does not exist (pass the CSV chunkpose run --bop wrote)")
    problems = check_bop_results(args.results)
    for problem in problems:
        calls.warn(f"{args.results}: {problem}")
    result = evaluate(args.bop, args.results, split=split_folder(args.bop, args.split).folder, targets_path=args.targets,
                      device=calls.resolve_device(args.device))
    result["format_problems"] = problems
    out = Path(args.out) if args.out is not None else Path(args.results).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(out / EVAL_JSON, result)
    plot(result, out / EVAL_PLOT)
    print(format_table(result), file=sys.stderr if args.json else sys.stdout)
    print(f"written {out / EVAL_JSON} and {out / EVAL_PLOT}", file=sys.stderr)
    if args.json:
        keys = ("AR", "AR_VSD", "AR_MSSD", "AR_MSPD", "ADD(-S)_AUC", "ADD(-S)_recall_0.1d", "targets", "estimates",
                "images", "time_per_image", "method", "dataset", "split")
        line = {"command": "eval", **{k: result.get(k) for k in keys}, "eval_json": str(out / EVAL_JSON),
                "plot": str(out / EVAL_PLOT)}
        print(json.dumps(to_jsonable(line), separators=(",", ":")))
    return EXIT_OK
