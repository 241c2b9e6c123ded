"""Tracking that notices when it is lost, with several objects under one budget: a synthetic
sequence of three objects in which one is hidden behind a board for a few frames and another
jumps, tracked by one MultiObjectEstimator. Per frame and object: the health figure, lost /
re-registered, ADD / diameter; a picture of the key frames' overlays and a health plot.

    python benchmarks/tracking_health.py             # 640x480, 12 frames
    python benchmarks/tracking_health.py --quick     # 320x240, 8 frames

Masks are given to the tracker only on the jumping object's lost frames (as a detector would
give them); the hidden object is found again from its grown last good silhouette.
Writes tracking_health.{md,json,png} under benchmarks/results/<machine>/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_run_args, apply_quick, destination, environment, header_lines,  # noqa: E402
                    markdown_table, saved_payload, stamp_figure, write_json, write_markdown)

from chunkpose.metrics import add_error  # noqa: E402

QUICK = {"width": 320, "height": 240, "frames": 8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, QUICK)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--budget-gb", type=float, default=1.0)
    p.add_argument("--hypotheses", type=int, default=84)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    apply_quick(args, QUICK)
    return args


def make_sequence(args):
    from chunkpose.synth import Jump, Occlusion, make_scene

    hide, jump = 3, args.frames - 3
    events = [Occlusion(start=hide, frames=2, obj="mug"), Jump(frame=jump, obj="duck")]
    return make_scene(objects=["mug", "drill", "duck"], width=args.width, height=args.height, frames=args.frames,
                      seed=args.seed, distractors=0, footprint=0.05, events=events)


def measure(args) -> dict:
    from chunkpose.multi_object import MultiObjectEstimator

    scene = make_sequence(args)
    est = MultiObjectEstimator({t.name: t.mesh for t in scene.objects}, budget_gb=args.budget_gb,
                               device=args.device, hypotheses=args.hypotheses)
    rows, pictures = [], {}
    for k in tqdm(range(len(scene.rgb)), desc="frames"):
        t0 = time.perf_counter()
        if k == 0:
            results = est.register(scene.rgb[0], scene.depth[0], scene.K, {t.name: t.masks[0] for t in scene.objects})
        else:
            masks = {"duck": scene.objects[2].masks[k]} if "jump" in scene.objects[2].events[k] or \
                (k > 0 and "jump" in scene.objects[2].events[k - 1]) else None
            results = est.track(scene.rgb[k], scene.depth[k], scene.K, masks)
        seconds = time.perf_counter() - t0
        for t in scene.objects:
            r = results[t.name]
            rows.append({"frame": k, "object": t.name, "events": list(t.events[k]), "health": r.health,
                         "lost": r.lost, "reregistered": r.reregistered,
                         "add_over_d": add_error(r.pose, t.poses[k], t.mesh.vertices) / t.mesh.diameter,
                         "frame_seconds": seconds, "peak_bytes": est.last_report.total_peak_bytes})
        pictures[k] = _overlay(scene, k, results)
    payload = {"environment": environment(args.device), "settings": {k: getattr(args, k) for k in
               ("width", "height", "frames", "budget_gb", "hypotheses", "seed")}, "records": rows}
    keys = _key_frames(rows, len(scene.rgb))
    payload["key_frames"] = keys
    return payload, {k: pictures[k] for k in keys}


def _overlay(scene, k, results):
    from chunkpose.vis import overlay_objects

    items = []
    for t in scene.objects:
        v = np.asarray(t.mesh.vertices)
        r = results[t.name]
        items.append((r.pose, np.stack([v.min(0), v.max(0)]), None, r.lost and not r.reregistered))
    lost = [name for name, r in results.items() if r.lost and not r.reregistered]
    found = [name for name, r in results.items() if r.reregistered]
    text = f"frame {k}" + (f"  lost: {', '.join(lost)}" if lost else "") + \
        (f"  re-registered: {', '.join(found)}" if found else "")
    return overlay_objects(scene.rgb[k], scene.K, items, text)


def _key_frames(rows, n):
    """Before the events, the first lost frame, the first re-registered frame, the last frame."""
    lost = [r["frame"] for r in rows if r["lost"] and not r["reregistered"]]
    found = [r["frame"] for r in rows if r["reregistered"]]
    keys = [0, lost[0] if lost else 1, found[0] if found else 2, n - 1]
    return sorted(set(keys))


def write_reports(payload: dict, pictures: dict, out: Path, stem: str) -> list:
    """The table (markdown) and the picture: key frames' overlays over the health plot (the
    plot alone when redrawn from JSON, which keeps no images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = payload["settings"], payload["records"]
    table = [[r["frame"], r["object"], ",".join(r["events"]), r["health"], "yes" if r["lost"] else "",
              "yes" if r["reregistered"] else "", r["add_over_d"], r["frame_seconds"], r["peak_bytes"] / 2**20]
             for r in rows]
    lines = [f"# Tracking health: 3 objects, {s['frames']} frames at {s['width']}x{s['height']}, one budget of "
             f"{s['budget_gb']} GiB", "", *header_lines(payload["environment"]), "",
             "The mug is hidden behind a board in frames 3-4; the duck jumps (1.2 diameters, 90 degrees) at frame "
             f"{s['frames'] - 3} and its mask is given on that frame and the next. Lost: health below the default "
             "threshold (chunkpose.pipeline.health.HEALTH_THRESHOLD).", "",
             markdown_table(["frame", "object", "events", "health", "lost", "re-registered", "ADD / d",
                             "frame s (all objects)", "peak MiB"], table), "", f"![tracking]({stem}.png)"]
    write_markdown(out / f"{stem}.md", lines)
    fig = plt.figure(figsize=(4 * max(len(pictures), 1), 6.5))
    for i, (k, image) in enumerate(sorted(pictures.items())):
        ax = fig.add_subplot(2, max(len(pictures), 1), i + 1)
        ax.imshow(image)
        ax.set_axis_off()
    ax = fig.add_subplot(2, 1, 2)
    for name in dict.fromkeys(r["object"] for r in rows):
        mine = [r for r in rows if r["object"] == name]
        ax.plot([r["frame"] for r in mine], [r["health"] for r in mine], marker="o", label=name)
    from chunkpose.pipeline.health import HEALTH_THRESHOLD

    ax.axhline(HEALTH_THRESHOLD, color="grey", linestyle="--", label="lost below")
    ax.set_xlabel("frame")
    ax.set_ylabel("health")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="lower left")
    stamp_figure(fig, payload["environment"])
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)
    return [out / f"{stem}.md", out / f"{stem}.png"]


def main(argv=None) -> int:
    args = parse_args(argv)
    payload, pictures = saved_payload(args), {}
    if payload is None:
        payload, pictures = measure(args)
    out, stem = destination("tracking_health", args, payload["environment"])
    if not args.from_json:
        write_json(out / f"{stem}.json", payload)
    write_reports(payload, pictures, out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
