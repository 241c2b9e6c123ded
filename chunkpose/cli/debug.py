"""--debug outputs: the observed cloud and the posed mesh (to check scale and alignment),
the mask, and a picture of the best hypotheses' crops, rendered beside observed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from chunkpose.cli.calls import warn


def write_debug(tmp: Path, folder: str, frame, mesh, pose, result, est=None, mask=None) -> Path:
    """debug/<folder>/: scene_raw.ply, model_tf.obj, ob_mask.png (registration) and, when the
    result has candidates and the estimator can inspect them, crops.png: per hypothesis
    (best first, score written in) the rendered and the observed colour and depth crops."""
    from chunkpose.io.debug import write_crop_grid, write_mesh_at_pose, write_scene_raw

    out = tmp / "debug" / folder
    out.mkdir(parents=True, exist_ok=True)
    write_scene_raw(out / "scene_raw.ply", frame.depth, frame.K, frame.rgb)
    write_mesh_at_pose(out / "model_tf.obj", mesh, pose)
    if mask is not None:
        import cv2

        cv2.imwrite(str(out / "ob_mask.png"), np.asarray(mask, np.uint8) * 255)
    candidates = getattr(result, "candidates", None)
    if est is not None and hasattr(est, "inspect_crops") and candidates is not None and len(candidates):
        try:
            crops = est.inspect_crops(frame.rgb, frame.depth, frame.K, candidates, mask=mask)
            labels = [f"{float(x):.3f}" for x in getattr(result, "candidate_scores", [])] or None
            write_crop_grid(out / "crops.png", [crops["rendered"], crops["observed"], crops["rendered_depth"],
                                                crops["observed_depth"]], labels=labels, columns=2)
        except Exception as err:  # noqa: BLE001 - a debug picture must never fail the run
            warn(f"could not draw the crop grid ({type(err).__name__}: {err})")
    return out
