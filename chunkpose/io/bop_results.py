"""BOP files a run writes: the results file's name and its rows.

Results file names: ``METHOD_DATASET-SPLIT[-SPLITTYPE][_ID].csv``. bop_toolkit's parser
splits the name at the first ``.`` (the extension), then at ``_`` (method, then dataset
and split), then the second part at ``-``. So the method must not contain ``_`` or
``.``, and dataset, split and split type none of ``_``, ``-``, ``.``.

Results rows: ``scene_id,im_id,obj_id,score,R,t,time``, R row-major 3x3 and t in
millimetres, space separated; time is the image's, the same for all its estimates.
"""
from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chunkpose.errors import InputError
from chunkpose.io.bop import TIME_TOLERANCE_S, BopFileError

RESULTS_HEADER = "scene_id,im_id,obj_id,score,R,t,time"

# The dataset names of bop_toolkit's dataset_params.py, with the spellings one meets in
# folder and archive names (upper case, hyphens: "YCB-V", "LM-O", "T-LESS").
BOP_DATASETS = (
    "lm", "lmo", "tless", "tudl", "tyol", "ruapc", "icmi", "icbin", "itodd", "itoddmv", "hbs", "hb",
    "ycbv", "hope", "hopev2", "hot3d", "handal", "ipd", "xyzibd",
)
_DATASET_ALIASES = {
    "linemod": "lm", "linemodoccluded": "lmo", "linemodocclusion": "lmo", "occludedlinemod": "lmo",
    "homebrewed": "hb", "homebreweddb": "hb", "ycbvideo": "ycbv",
}



def bop_dataset_name(name) -> str:
    """BOP's name of a dataset from a folder or archive name ("YCB-V", "ycbv_test_bop19",
    "/data/bop/lmo" -> "ycbv", "ycbv", "lmo").

    Unknown names become the name lowercased with everything but letters and digits
    removed (so that bop_toolkit can parse the results file name), with a warning.
    """
    base = Path(str(name)).name or Path(str(name)).resolve().name  # "." -> the folder's name
    lowered = base.lower()

    def squash(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text)

    candidates = [squash(lowered)]
    first = re.split(r"[_.\s]", lowered)[0]  # "ycbv_test_bop19", "tless_base" -> "ycbv", "tless"
    candidates.append(squash(first))
    for cand in candidates:
        if cand in BOP_DATASETS:
            return cand
        if cand in _DATASET_ALIASES:
            return _DATASET_ALIASES[cand]
    fallback = candidates[0] or "dataset"
    warnings.warn(f"dataset name {base!r} is not one of BOP's ({', '.join(BOP_DATASETS)}); "
                  f"naming the results {fallback!r}", stacklevel=2)
    return fallback


def _check_name_part(value: str, what: str, forbidden: str) -> str:
    value = str(value)
    bad = sorted({c for c in value if c in forbidden or c.isspace() or c in "/\\,"})
    if not value or bad:
        shown = ", ".join(repr(c) for c in bad) if bad else "nothing"
        raise InputError(f"{what}: {value!r} contains {shown}; bop_toolkit splits results file names at "
                         f"'_', '-' and '.', so a {what} may not contain {', '.join(repr(c) for c in forbidden)}"
                         + (" (use '-' instead of '_')" if what == "method" else ""))
    return value


def results_filename(method: str, dataset: str, split: str = "test", split_type: str | None = None,
                     optional_id: str | None = None) -> str:
    """BOP results CSV name: METHOD_DATASET-SPLIT[-SPLITTYPE][_ID].csv.

    Args:
        method: the method's name; "_" and "." are refused (InputError): bop_toolkit reads
            everything before the first "_" as the method, and renaming silently could make
            two methods' files collide.
        dataset: a dataset or folder name, mapped to BOP's spelling with bop_dataset_name.
        split: "test", "val", ...; split_type: e.g. "primesense" for T-LESS (optional).
        optional_id: an id BOP allows after the split ("_ID"), e.g. a date.
    """
    method = _check_name_part(method, "method", "_.")
    dataset = _check_name_part(bop_dataset_name(dataset), "dataset", "_-.")
    split = _check_name_part(split, "split", "_-.")
    name = f"{method}_{dataset}-{split}"
    if split_type is not None:
        name += "-" + _check_name_part(split_type, "split type", "_-.")
    if optional_id is not None:
        name += "_" + _check_name_part(optional_id, "optional id", "_.")
    return name + ".csv"


def parse_results_filename(path) -> dict:
    """Method, dataset, split and split type of a results file name, read the way
    bop_toolkit reads it; InputError when it does not follow METHOD_DATASET-SPLIT."""
    name = Path(str(path)).name
    stem = name.split(".")[0]
    parts = stem.split("_")
    dataset_parts = parts[1].split("-") if len(parts) > 1 else []
    if len(parts) < 2 or len(dataset_parts) < 2 or not parts[0] or not all(dataset_parts[:2]):
        raise InputError(f"results file name {name!r} does not follow METHOD_DATASET-SPLIT.csv "
                         "(e.g. chunkpose_ycbv-test.csv; the method may not contain '_')")
    return {
        "method": parts[0], "dataset": dataset_parts[0], "split": dataset_parts[1],
        "split_type": dataset_parts[2] if len(dataset_parts) > 2 else None,
        "ext": ".".join(name.split(".")[1:]),
    }


# --------------------------------------------------------------------------- results


def read_bop_results(path) -> list[dict]:
    """Rows of a BOP19 results CSV: scene_id, im_id, obj_id, score, R (3,3), t (3,) in mm,
    time (s; negative = unknown). Like bop_toolkit, the header line is optional."""
    path = Path(path)
    if not path.is_file():
        raise BopFileError(f"results file {path} does not exist", "pass the CSV written by chunkpose run --bop")
    rows = []
    with open(path, newline="") as f:
        for line_no, fields in enumerate(csv.reader(f), start=1):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if line_no == 1 and ",".join(fields).strip().startswith(RESULTS_HEADER):
                continue
            if len(fields) != 7:
                raise BopFileError(f"{path.name} line {line_no} has {len(fields)} fields",
                                   f"each line must be {RESULTS_HEADER}")
            try:
                R = np.array(fields[4].split(), dtype=np.float64)
                t = np.array(fields[5].split(), dtype=np.float64)
                row = {"scene_id": int(fields[0]), "im_id": int(fields[1]), "obj_id": int(fields[2]),
                       "score": float(fields[3]), "time": float(fields[6])}
            except ValueError:
                raise BopFileError(f"{path.name} line {line_no} has a value that is not a number",
                                   f"each line must be {RESULTS_HEADER} with R 9 and t 3 space-separated numbers") from None
            if R.size != 9 or t.size != 3:
                raise BopFileError(f"{path.name} line {line_no}: R has {R.size} values and t {t.size}",
                                   "R is 9 numbers (row-major 3x3), t 3 numbers in millimetres")
            row["R"] = R.reshape(3, 3)
            row["t"] = t
            rows.append(row)
    return rows


def check_bop_results(path) -> list[str]:
    """Problems bop_toolkit's results checker would report, as sentences ([] = fine):
    the file name, the 7 fields of each line, no rows, and differing times within an image."""
    problems = []
    try:
        parse_results_filename(path)
    except ValueError as err:
        problems.append(str(err))
    try:
        rows = read_bop_results(path)
    except BopFileError as err:
        return problems + [str(err)]
    if not rows:
        problems.append("the results file has no estimates")
    problems += _strict_line_problems(path)
    times: dict[tuple[int, int], float] = {}
    for row in rows:
        key = (row["scene_id"], row["im_id"])
        if key in times and abs(times[key] - row["time"]) > TIME_TOLERANCE_S:
            problems.append(f"scene {key[0]} image {key[1]}: estimates carry different times")
            break
        times.setdefault(key, row["time"])
    return problems


def _strict_line_problems(path) -> list[str]:
    """What bop_toolkit's reader (a plain split on ",", 7 fields per line, the header only as
    line 1, float() of each part) refuses although a CSV reader reads it: blank lines, quotes."""
    with open(path, newline="") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1 and RESULTS_HEADER in line:
                continue
            if not line.strip():
                return [f"line {line_no} is blank: bop_toolkit's reader needs 7 comma-separated values on every line"]
            if '"' in line or len(line.split(",")) != 7:
                return [f"line {line_no} has quotes or commas inside a field: bop_toolkit's reader splits on every "
                        "comma and reads unquoted numbers"]
    return []


@dataclass(frozen=True)
class SplitFolder:
    """A BOP split as a folder and as a results-file name: T-LESS's "test_primesense" folder
    is split "test", split type "primesense" (``results_filename(..., split, split_type)``)."""

    folder: str
    split: str
    split_type: str | None = None


def split_folder(dataset_dir, split: str = "test") -> SplitFolder:
    """The folder of ``split`` in a BOP dataset, and its name parts.

    "test_primesense" names its folder; a bare "test" is DATASET/test/, else the one
    DATASET/test_<type>/ there is (T-LESS and HB publish only test_primesense, which is
    bop_toolkit's default split type for them).

    Args:
        dataset_dir: the dataset folder.
        split: "test", "val", "test_primesense", ...

    Returns:
        SplitFolder (its folder may not exist: the readers say so).
    """
    root = Path(dataset_dir)
    if "_" in split:
        base, kind = split.split("_", 1)
        return SplitFolder(split, base, kind)
    typed = sorted(p.name for p in root.glob(f"{split}_*") if p.is_dir()) if root.is_dir() else []
    if not (root / split).is_dir() and len(typed) == 1:
        return SplitFolder(typed[0], split, typed[0].split("_", 1)[1])
    return SplitFolder(split, split)


def bop_scene_ids(dataset_dir, split: str = "test") -> list[int]:
    """Scene ids present in DATASET/<split>/ (folders named by 6 digits)."""
    folder = Path(dataset_dir) / split
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


__all__ = [
    "BOP_DATASETS", "RESULTS_HEADER", "bop_dataset_name", "bop_scene_ids", "check_bop_results",
    "SplitFolder", "parse_results_filename", "read_bop_results", "results_filename", "split_folder",
]
