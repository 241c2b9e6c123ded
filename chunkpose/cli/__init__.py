"""The ``chunkpose`` command: run on a YCBInEOAT or BOP scene, a synthetic demo, benchmarks.

    chunkpose run --scene DIR [--mesh FILE | --mesh NAME=FILE ...] [--budget-gb G] [--device cpu|cuda] ...
    chunkpose run --scenes DIR [--mesh FILE] ...     (every scene folder in DIR)
    torchrun --nproc-per-node N -m chunkpose run ...   (BOP images / videos spread over the ranks)
    chunkpose run --bop DATASET_DIR [--split test] [--scene-id N] [--detections FILE] [--targets FILE]
                  [--method NAME] [--mesh FILE] ...
    chunkpose eval --bop DATASET_DIR --results METHOD_DATASET-SPLIT.csv [--split test] [--targets FILE]
    chunkpose demo [--width 3072 --height 2048] [--budget-gb 1] [--frames 5] ...
    chunkpose bench ...            (forwards to benchmarks/ in a source checkout)

The package: parser (arguments), calls (what the loops share: estimator, per-pose records),
scene / bop / score / demo / bench (the commands: run --scene, run --bop, eval, demo, bench), progress, summary (report.json, tables, --json),
debug (--debug files). Bad input ends with one line on stderr, ``chunkpose: error: <what>
(<how to fix>)``, exit code 2 and no output folder: exactly the input errors
(chunkpose.errors.InputError and its kinds, UserError for the arguments) and BudgetTooSmall;
anything else is a bug and keeps its traceback. Ctrl-C keeps the finished frames, writes a
valid report and exits with 130. With --json the last line of stdout is one JSON object.
"""
from __future__ import annotations

import math
import os
import sys

from chunkpose.cli.calls import chunk_plan, pose_estimator, resolve_default_weights
from chunkpose.cli.parser import DEMO_BUILTINS, DEMO_MESH, UserError, build_parser, split_mesh_args
from chunkpose.cli.summary import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

__all__ = ["DEMO_BUILTINS", "DEMO_MESH", "UserError", "build_parser", "chunk_plan", "main"]


def _user_error_types() -> tuple:
    from chunkpose.engine import BudgetTooSmall
    from chunkpose.errors import InputError

    return (UserError, InputError, BudgetTooSmall)


def one_line(err) -> str:
    """The error's message on one line; a budget that is too small says the flag to pass."""
    text = " ".join(str(err).split()) or type(err).__name__
    minimum = getattr(err, "minimum_gb", None)
    if minimum:
        text += f" (pass --budget-gb {math.ceil(minimum * 1000) / 1000:g} or more)"
    return text


def _dispatch(argv, estimator_factory) -> int:
    parser = build_parser()
    if argv and argv[0] == "bench":  # everything after "bench" belongs to the benchmarks
        from chunkpose.cli.bench import run_bench

        return run_bench(argv[1:])
    args = parser.parse_args(argv)
    if args.version:
        from chunkpose import __version__

        print(__version__)
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    factory = estimator_factory or pose_estimator
    if args.command == "eval":
        from chunkpose.cli.score import run_eval

        return run_eval(args)
    if args.command == "run":
        split_mesh_args(args)
        resolve_default_weights(args)
        if sum(x is not None for x in (args.scene, args.scenes, args.bop)) != 1:
            raise UserError("give exactly one of --scene DIR (YCBInEOAT), --scenes DIR (a folder of them) "
                            "or --bop DATASET_DIR (BOP)")
        if args.bop is not None:
            from chunkpose.cli.bop import run_bop

            return run_bop(args, factory)
        if args.scenes is not None:
            from chunkpose.cli.scene import run_scenes

            return run_scenes(args, factory)
        from chunkpose.cli.scene import run_ycbineoat

        return run_ycbineoat(args, factory)
    from chunkpose.cli.demo import run_demo

    return run_demo(args, factory)


def main(argv=None, estimator_factory=None) -> int:
    """Entry point. ``estimator_factory(mesh, **kwargs)`` defaults to chunkpose.PoseEstimator
    (the argument exists so that the command loop can be tested without the networks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv, estimator_factory)
    except KeyboardInterrupt:
        print("chunkpose: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if os.environ.get("CHUNKPOSE_TRACEBACK") or not isinstance(err, _user_error_types()):
            raise
        print(f"chunkpose: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
