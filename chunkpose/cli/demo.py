"""``chunkpose demo``: a synthetic scene with ground truth, registered and tracked at full
resolution under the budget."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from chunkpose.cli import calls, summary
from chunkpose.cli.parser import DEMO_BUILTINS, DEMO_MESH, UserError
from chunkpose.cli.scene import register_and_track


def demo_mesh(args):
    """The demo's object: a builtin name (as is, for synth) or a loaded mesh file."""
    choice = args.mesh if args.mesh is not None else DEMO_MESH
    if args.mesh_scale is None and str(choice) in DEMO_BUILTINS:
        return str(choice)
    if str(choice) in DEMO_BUILTINS:
        from chunkpose.shapes import builtin_meshes

        choice = builtin_meshes()[str(choice)]
    elif not Path(choice).is_file():
        raise UserError(f"--mesh {choice}: no such file (give a mesh file or one of {', '.join(DEMO_BUILTINS)})")
    return calls.load_mesh(choice, args.mesh_scale)


def run_demo(args, estimator_factory) -> int:
    import chunkpose.synth as synth
    from chunkpose.io.scene_files import Frame
    from chunkpose.io.results import OutputDir

    od = OutputDir(args.out)
    device = calls.resolve_device(args.device)
    mesh_choice = demo_mesh(args)  # a bad --mesh fails before anything is made
    t_scene = time.perf_counter()
    print(f"making a {args.width}x{args.height} synthetic scene with {args.frames} frames...", file=sys.stderr)
    scene = synth.make_scene(mesh=mesh_choice, width=args.width, height=args.height, frames=args.frames, seed=args.seed)
    scene_time = time.perf_counter() - t_scene
    mesh = scene.mesh
    est = calls.make_estimator(estimator_factory, mesh, args, device)
    K = np.asarray(scene.K, dtype=np.float64)
    frames = (Frame(f"{i:06d}", scene.rgb[i], scene.depth[i], K, scene.masks[i] if i == 0 else None,
                    np.asarray(scene.poses[i], np.float64)) for i in range(args.frames))
    state = calls.RunState()
    with od as tmp:
        plan = register_and_track(args, est, frames, args.frames, mesh, tmp, state)
        report_head = summary.head(args, "demo", device, width=args.width, height=args.height,
                                   frames_total=args.frames, seed=args.seed, scene_time_s=scene_time,
                                   mesh_diameter=float(mesh.diameter),
                                   mesh=scene.info.get("object") if scene.info.get("object") != "user mesh" else str(args.mesh))
        return summary.finish(args, od, tmp, "demo", state, report_head, f"chunkpose demo {args.width}x{args.height}",
                              plan, extra_json={"width": args.width, "height": args.height})
