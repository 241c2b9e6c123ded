"""A run's results: its output folder, report.json, ob_in_cam poses, the BOP results CSV.

A run writes into a hidden temporary folder next to the requested one and moves it into
place at the end (chunkpose.io.folders), so a failed run leaves nothing behind and a
reader of the output never sees half a report. An earlier chunkpose output at the same
place (it has report.json) is replaced; any other non-empty folder is refused rather than
overwritten.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from chunkpose.errors import InputError
from chunkpose.io.folders import replace_folder

REPORT_NAME = "report.json"
BOP_CSV_HEADER = ("scene_id", "im_id", "obj_id", "score", "R", "t", "time")


class OutputFolderError(InputError):
    """The requested output folder cannot be used; ``str`` is "<what> (<how to fix>)"."""


class OutputDir:
    """Context manager: ``with OutputDir(out) as tmp: ...write into tmp...; commit()``.

    ``path`` is the temporary folder while open (the ``with`` value). ``commit()`` moves it to
    ``final``. Leaving the block without commit (an exception) deletes the temporary folder.

    Args:
        final: the requested output folder (created or replaced at commit).

    Raises:
        OutputFolderError: (an InputError) ``final`` is a file, or a non-empty folder that holds
            no chunkpose report.
    """

    def __init__(self, final):
        self.final = Path(final).expanduser().resolve()
        if self.final.exists():
            if not self.final.is_dir():
                raise OutputFolderError(f"--out {self.final} is a file (choose a folder path for --out)")
            if any(self.final.iterdir()) and not (self.final / REPORT_NAME).is_file():
                raise OutputFolderError(
                    f"output folder {self.final} is not empty and holds no chunkpose report "
                    "(choose a new --out folder; chunkpose only replaces its own earlier outputs)"
                )
        self.path: Path | None = None
        self.committed = False

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.path

    def commit(self) -> Path:
        """Move the finished folder into place (replacing an earlier chunkpose output).

        Returns:
            Path of the final folder.

        Raises:
            RuntimeError: called outside the with-block or twice.
        """
        if self.path is None or self.committed:
            raise RuntimeError("OutputDir.commit() outside its with-block or twice")
        replace_folder(self.path, self.final)
        self.committed = True
        return self.final

    def discard(self) -> None:
        """Delete the temporary folder unless it was committed (errors ignored)."""
        if self.path is not None and not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            self.discard()
        return False


def to_jsonable(value):
    """numpy / torch values -> plain Python for json (NaN and inf become None).

    Objects with ``to_dict()`` are converted through it; Paths become strings, anything else
    unknown ``str(value)``.

    Args:
        value: any value (nested dicts, lists, tuples, arrays, tensors, scalars).

    Returns:
        dicts (str keys), lists, bool, int, float, str or None.
    """
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor without importing torch
        value = value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)


def write_json(path, data) -> Path:
    """Write ``data`` (through to_jsonable) as indented JSON with a final newline.

    Args:
        path: the file to write.
        data: any value to_jsonable accepts.

    Returns:
        Path of the file.
    """
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    return path


def write_pose_txt(path, pose) -> Path:
    """A 4x4 pose as 4 lines of 4 numbers (the ob_in_cam/<frame>.txt format).

    Args:
        path: the file to write.
        pose: (4,4) array-like, translation in metres.

    Returns:
        Path of the file.

    Raises:
        InputError: ``pose`` is not (4,4).
    """
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        raise InputError(f"pose must be (4,4), got {pose.shape}")
    np.savetxt(path, pose, fmt="%.8f")
    return Path(path)


def bop_csv_row(scene_id: int, im_id: int, obj_id: int, score: float, pose, time_s: float) -> dict:
    """One BOP results row from a pose (4,4) in metres: R row-major, t in millimetres.

    Args:
        scene_id: BOP scene id.
        im_id: BOP image id.
        obj_id: BOP object id.
        score: the estimate's score.
        pose: (4,4) model-in-camera pose, metres.
        time_s: seconds the estimate took (BOP's time column).

    Returns:
        dict with the BOP_CSV_HEADER keys; R and t as space-separated text.
    """
    pose = np.asarray(pose, dtype=np.float64)
    return {
        "scene_id": int(scene_id),
        "im_id": int(im_id),
        "obj_id": int(obj_id),
        "score": float(score),
        "R": " ".join(f"{v:.8f}" for v in pose[:3, :3].reshape(-1)),
        "t": " ".join(f"{v:.4f}" for v in pose[:3, 3] * 1000.0),
        "time": float(time_s),
    }


def write_bop_csv(path, rows) -> Path:
    """BOP results CSV (header scene_id,im_id,obj_id,score,R,t,time).

    Args:
        path: the file to write.
        rows: dicts with the BOP_CSV_HEADER keys (e.g. from bop_csv_row).

    Returns:
        Path of the file.
    """
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BOP_CSV_HEADER, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def read_bop_csv(path) -> list[dict]:
    """Rows of a BOP results CSV with R (3,3) and t (3,) in millimetres as arrays.

    Args:
        path: the CSV file.

    Returns:
        list of dicts: scene_id, im_id, obj_id (int), score, time (float), R (3,3) float64 and
        t (3,) float64 in millimetres.
    """
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({
                "scene_id": int(row["scene_id"]), "im_id": int(row["im_id"]), "obj_id": int(row["obj_id"]),
                "score": float(row["score"]), "R": np.array(row["R"].split(), float).reshape(3, 3),
                "t": np.array(row["t"].split(), float), "time": float(row["time"]),
            })
    return rows


__all__ = [
    "BOP_CSV_HEADER", "OutputDir", "OutputFolderError", "REPORT_NAME", "bop_csv_row", "read_bop_csv",
    "to_jsonable", "write_bop_csv", "write_json", "write_pose_txt",
]
