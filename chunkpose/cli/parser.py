"""The command line's arguments: ``chunkpose run | demo | bench | eval``.

FoundationPose's demo flags are accepted as aliases: --test_scene_dir, --mesh_file,
--est_refine_iter, --track_refine_iter, --debug_dir (and --debug 0..3 means the same).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

#: The demo's object unless --mesh is given: a builtin without rotational symmetry (the mug
#: looks the same turned upside down when its label is not used, so its ADD is ambiguous).
DEMO_MESH = "drill"
DEMO_BUILTINS = ("blocks", "drill", "duck", "mug")


class UserError(Exception):
    """Something the user can fix on the command line; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with our one-line error format."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see `{self.prog} --help`)")


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def non_negative_int(text):
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def _estimator_options(p, default_budget):
    g = p.add_argument_group("estimator")
    g.add_argument("--budget-gb", type=positive_float, metavar="G", default=default_budget,
                   help=f"device memory budget in GiB (default {default_budget:g})")
    g.add_argument("--device", default="auto", metavar="cpu|cuda", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--weights", type=Path, metavar="DIR", default=None,
                   help="folder with the official FoundationPose weights (default: ./weights when it holds "
                        "both run folders, as upstream's demo; else, or with 'none', the weight-free geometric pair)")
    g.add_argument("--refine-iters", "--est_refine_iter", type=positive_int, metavar="N", default=5,
                   help="refinement iterations at registration (5)")
    g.add_argument("--track-iters", "--track_refine_iter", type=positive_int, metavar="N", default=2,
                   help="refinement iterations per tracked frame (2)")


def _output_options(p, default_out):
    g = p.add_argument_group("output")
    g.add_argument("--out", "--debug_dir", type=Path, metavar="DIR", default=Path(default_out),
                   help=f"output folder (default {default_out})")
    g.add_argument("--json", action="store_true", help="print one JSON summary object as the last line of stdout")
    g.add_argument("--debug", type=int, choices=range(0, 4), default=0, metavar="0..3",
                   help="2: scene_raw.ply, model_tf.obj and a picture of the best hypotheses' rendered and "
                        "observed crops for the first frame; 3: for every frame")


def _run_parser(sub):
    run = sub.add_parser("run", help="poses for a YCBInEOAT scene (--scene) or a BOP scene (--bop)",
                         description="Register on the first frame with its mask and track the rest (YCBInEOAT), "
                                     "or register every annotated instance of a BOP scene.")
    src = run.add_argument_group("input")
    src.add_argument("--scene", "--test_scene_dir", type=Path, metavar="DIR",
                     help="YCBInEOAT folder: rgb/, depth/ (uint16 mm), masks/, cam_K.txt")
    src.add_argument("--scenes", type=Path, metavar="DIR",
                     help="a folder of YCBInEOAT scene folders: every video, outputs in OUT/<scene>/")
    src.add_argument("--bop", type=Path, metavar="DATASET_DIR", help="BOP dataset folder (models/, <split>/)")
    src.add_argument("--split", default="test", metavar="NAME", help="BOP split folder (default test)")
    src.add_argument("--scene-id", type=non_negative_int, metavar="N",
                     help="BOP scene id (default: every scene with targets, else every scene of the split)")
    src.add_argument("--detections", type=Path, metavar="FILE",
                     help="BOP: detections JSON (.json or .json.gz; scene_id, image_id, category_id, score, bbox, "
                          "segmentation RLE, time), e.g. BOP's default detections; default: the ground-truth mask_visib/")
    src.add_argument("--targets", type=Path, metavar="FILE",
                     help="BOP: test_targets_bop19.json (default: the dataset's, when present)")
    src.add_argument("--method", default="chunkpose", metavar="NAME",
                     help="BOP: method name of the results file METHOD_DATASET-SPLIT.csv (no '_' or '.'; default chunkpose)")
    src.add_argument("--obj-id", type=positive_int, metavar="ID", action="append", help="BOP: only these object ids (repeatable)")
    src.add_argument("--mesh", "--mesh_file", metavar="FILE|NAME=FILE", action="append", default=None,
                     help="object mesh in metres (default: the scene's mesh/ folder; BOP: models/obj_XXXXXX.ply); "
                          "repeat as --mesh NAME=FILE for a scene with several objects (masks/NAME/ or labels/)")
    src.add_argument("--mesh-scale", type=positive_float, metavar="S", default=None,
                     help="multiply mesh coordinates by this (0.001 for a mesh in millimetres)")
    size = src.add_mutually_exclusive_group()
    size.add_argument("--downscale", type=positive_float, metavar="F", default=None, help="resize the input by this factor first")
    size.add_argument("--shorter-side", type=positive_int, metavar="N", default=None, help="resize the input so its shorter side is N")
    src.add_argument("--zfar", type=positive_float, metavar="Z", default=None, help="ignore depth at or beyond this many metres")
    src.add_argument("--frames", type=positive_int, metavar="N", default=None, help="process at most N frames (images for BOP)")
    _estimator_options(run, 4.0)
    _output_options(run, "chunkpose_out")
    return run


def _demo_parser(sub):
    demo = sub.add_parser("demo", help="synthetic scene with ground truth, full resolution, under the budget",
                          description="Make a synthetic RGB-D scene, register and track at full resolution under the "
                                      "budget, print pose errors, peak memory and the chunk plan.")
    demo.add_argument("--width", type=positive_int, default=3072)
    demo.add_argument("--height", type=positive_int, default=2048)
    demo.add_argument("--frames", type=positive_int, default=5, help="frames: 1 registration + tracking (5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--mesh", "--mesh_file", default=None, metavar="FILE|NAME",
                      help=f"object: a mesh file in metres or a builtin ({', '.join(DEMO_BUILTINS)}); "
                           f"default {DEMO_MESH} (asymmetric, so ADD is meaningful)")
    demo.add_argument("--mesh-scale", type=positive_float, metavar="S", default=None,
                      help="multiply mesh coordinates by this (0.001 for a mesh in millimetres)")
    _estimator_options(demo, 1.0)
    _output_options(demo, "chunkpose_demo")
    return demo


def _eval_parser(sub):
    ev = sub.add_parser("eval", help="BOP19 average recall (VSD, MSSD, MSPD) and ADD(-S) AUC of a results CSV",
                        description="Score a BOP results CSV against a dataset split's ground truth with BOP19's "
                                    "protocol (no bop_toolkit needed); prints a table, writes bop_eval.json and a "
                                    "recall plot.")
    ev.add_argument("--bop", type=Path, metavar="DATASET_DIR", required=True,
                    help="BOP dataset folder (models/ or models_eval/, <split>/ with scene_gt.json)")
    ev.add_argument("--results", type=Path, metavar="CSV", required=True, help="results file METHOD_DATASET-SPLIT.csv")
    ev.add_argument("--split", default="test", metavar="NAME", help="split folder (default test)")
    ev.add_argument("--targets", type=Path, metavar="FILE",
                    help="test_targets_bop19.json (default: the dataset's; without one, instances with visib_fract >= 0.1)")
    ev.add_argument("--device", default="auto", metavar="cpu|cuda", help="device of the renderer for VSD (default auto)")
    ev.add_argument("--out", type=Path, metavar="DIR", default=None,
                    help="folder for bop_eval.json and bop_recall.png (default: next to the results file)")
    ev.add_argument("--json", action="store_true", help="print one JSON summary object as the last line of stdout")
    return ev


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="chunkpose", description="6D pose estimation at full camera resolution under a memory budget.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{run,eval,demo,bench}", parser_class=Parser)
    _run_parser(sub)
    _eval_parser(sub)
    _demo_parser(sub)
    bench = sub.add_parser("bench", help="run the benchmarks in benchmarks/ (source checkout)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def split_mesh_args(args) -> None:
    """``run``'s --mesh values into args.mesh (one unnamed FILE, a Path, or None) and
    args.object_meshes ({NAME: Path} from NAME=FILE).

    Raises:
        UserError: named and unnamed meshes mixed, two unnamed ones, an empty name or a name
            given twice.
    """
    specs = args.mesh or []
    named, plain = {}, []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and not Path(spec).exists():
            if not name or not path:
                raise UserError(f"--mesh {spec}: expected NAME=FILE with a non-empty name and file")
            if name in named:
                raise UserError(f"--mesh {name}=... is given twice")
            named[name] = Path(path)
        else:
            plain.append(Path(spec))
    if plain and (named or len(plain) > 1):
        raise UserError("--mesh: give one FILE for a one-object scene, or NAME=FILE for each object of a scene "
                        "with several")
    args.mesh = plain[0] if plain else None
    args.object_meshes = named
