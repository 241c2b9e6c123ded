"""A text table and a recall plot of an evaluate() result."""
from __future__ import annotations

import os
from pathlib import Path

COLUMNS = (("AR_VSD", "AR_VSD"), ("AR_MSSD", "AR_MSSD"), ("AR_MSPD", "AR_MSPD"), ("AR", "AR"),
           ("ADD(-S)_AUC", "ADD(-S) AUC"), ("ADD(-S)_recall_0.1d", "ADD(-S)<0.1d"))


def format_table(result: dict) -> str:
    """One line per object and one for all targets, the BOP19 numbers and ADD(-S).

    Args:
        result: what chunkpose.bop_eval.evaluate returns.
    Returns:
        The table as text (no trailing newline).
    """
    title = (f"BOP19 evaluation of {result.get('method', '?')} on {result.get('dataset', '?')}-"
             f"{result.get('split', '?')}: {result.get('images', 0)} images, {result.get('targets', 0)} targets, "
             f"{result.get('estimates', 0)} estimates evaluated")
    header = ["object", "targets"] + [label for _, label in COLUMNS]
    rows = []
    for obj_id, numbers in sorted(result.get("per_object", {}).items(), key=lambda kv: int(kv[0])):
        rows.append([str(obj_id), str(numbers["targets"])] + [f"{numbers[key]:.3f}" for key, _ in COLUMNS])
    rows.append(["all", str(result.get("targets", 0))] + [f"{result[key]:.3f}" for key, _ in COLUMNS])
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths)))

    lines = [title, line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    time = result.get("time_per_image")
    lines.append("time per image: " + ("not given (negative times in the results)" if time is None else f"{time:.3f} s"))
    lines.append(f"VSD delta {result.get('vsd_delta_mm', 15):g} mm, taus and thresholds 0.05..0.5; MSSD 0.05..0.5 x "
                 "diameter; MSPD 5..50 px at 640 px width; AR = mean of the three")
    return "\n".join(lines)


def plot(result: dict, path) -> Path:
    """Save a PNG of recall against threshold for VSD, MSSD, MSPD and ADD(-S).

    VSD shows the recall averaged over its 10 taus, with each tau as a thin line.
    Written to a temporary file first, so ``path`` is never half-written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    curves = result["curves"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
    vsd = np.asarray(curves["VSD"]["recall"])
    for row in vsd:
        axes[0].plot(curves["VSD"]["thresholds"], row, color="tab:blue", alpha=0.25, linewidth=0.8)
    axes[0].plot(curves["VSD"]["thresholds"], vsd.mean(axis=0), color="tab:blue", marker="o",
                 label=f"AR_VSD {result['AR_VSD']:.3f}")
    axes[0].set_xlabel("VSD threshold (mean over taus; thin: each tau)")
    axes[1].plot(curves["MSSD"]["thresholds"], curves["MSSD"]["recall"], color="tab:orange", marker="o",
                 label=f"AR_MSSD {result['AR_MSSD']:.3f}")
    axes[1].set_xlabel("MSSD threshold (x diameter)")
    axes[2].plot(curves["MSPD"]["thresholds"], curves["MSPD"]["recall"], color="tab:green", marker="o",
                 label=f"AR_MSPD {result['AR_MSPD']:.3f}")
    axes[2].set_xlabel("MSPD threshold (px at 640 px width)")
    axes[3].plot(np.asarray(curves["ADD(-S)"]["thresholds"]) * 100.0, curves["ADD(-S)"]["recall"], color="tab:red",
                 label=f"ADD(-S) AUC {result['ADD(-S)_AUC']:.3f}")
    axes[3].set_xlabel("ADD(-S) threshold (cm)")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("recall")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"{result.get('method', '')} on {result.get('dataset', '')}-{result.get('split', '')}: "
                 f"AR {result['AR']:.3f}")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.writing{path.suffix or '.png'}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["format_table", "plot"]
