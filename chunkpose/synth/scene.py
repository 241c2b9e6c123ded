"""What make_scene returns: the images, the camera and per-object ground truth, and how a
scene is written to disk (YCBInEOAT folders with the meshes, or a BOP dataset)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chunkpose.errors import InputError
from chunkpose.io.mesh import Mesh

LAYOUTS = ("ycbineoat", "bop")


@dataclass
class ObjectTrack:
    """Ground truth of one object of a scene, one entry per frame.

    Attributes:
        name: a file-name-safe name (the builtin's, a mesh file's stem, or "object<k>").
        mesh: its Mesh (metres).
        poses: [(4,4) float64] object in camera, metres.
        masks: [(H,W) bool] visible pixels (empty while it is occluded).
        full_masks: [(H,W) bool] its in-image silhouette ignoring everything in front of it
            (empty while out of view).
        events: [tuple of str] per frame, from "jump", "occluded", "reappeared".
        obj_id: 1-based position in the scene (the BOP obj_id and the label-image value).
        footprint: the mean image fraction of its silhouette over the frames it is not hidden.
    """

    name: str
    mesh: Mesh
    poses: list
    masks: list
    full_masks: list
    events: list = field(default_factory=list)
    obj_id: int = 1
    footprint: float = 0.0

    def __post_init__(self):
        if not self.events:
            self.events = [() for _ in self.poses]

    def event_frames(self, tag: str) -> list[int]:
        """The frames tagged ``tag`` ("jump", "occluded" or "reappeared"), ascending.

        Args:
            tag: the event tag.

        Returns:
            list of frame indices.
        """
        return [k for k, tags in enumerate(self.events) if tag in tags]

    @property
    def visible_fraction(self) -> list[float]:
        """Per frame, visible pixels / silhouette pixels (0 for an empty silhouette)."""
        return [float(v.sum() / max(f.sum(), 1)) for v, f in zip(self.masks, self.full_masks)]

    def __repr__(self) -> str:
        return f"ObjectTrack({self.name!r}, obj_id={self.obj_id}, frames={len(self.poses)}, mesh={self.mesh!r})"


@dataclass
class Scene:
    """A synthetic scene.

    The fields masks, poses, mesh, full_masks and footprint are those of the first object (what
    a single-object caller wants).

    Attributes:
        rgb: list of (H,W,3) uint8, one per frame.
        depth: list of (H,W) float32 metres (sensor model, 0 = missing).
        masks: the first object's visible masks, (H,W) bool per frame.
        K: (3,3) float64 intrinsics in pixels.
        poses: the first object's (4,4) float64 poses (object in camera, metres).
        mesh: the first object's Mesh.
        depth_clean: list of (H,W) float32 noise-free depth in metres.
        full_masks: the first object's silhouettes ignoring occluders, (H,W) bool per frame.
        footprint: the first object's mean image fraction.
        info: how the scene was drawn.
        objects: [ObjectTrack], the ground truth of each object.
    """

    rgb: list
    depth: list
    masks: list
    K: np.ndarray
    poses: list
    mesh: Mesh
    depth_clean: list = field(default_factory=list, repr=False)
    full_masks: list = field(default_factory=list, repr=False)
    footprint: float = 0.0
    info: dict = field(default_factory=dict)
    objects: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.objects:  # a scene built the old way: one object from the fields
            name = self.info.get("object_names", ["object"])[0]
            self.objects = [ObjectTrack(name, self.mesh, self.poses, self.masks, self.full_masks,
                                        footprint=self.footprint)]

    @property
    def width(self) -> int:
        return int(self.rgb[0].shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb[0].shape[0])

    @property
    def frames(self) -> int:
        return len(self.rgb)

    @property
    def names(self) -> list[str]:
        """The objects' names, in order."""
        return [track.name for track in self.objects]

    @property
    def events(self) -> list:
        """Per frame, the first object's event tags (see ObjectTrack.events)."""
        return self.objects[0].events

    def object(self, name: str) -> ObjectTrack:
        """The object named ``name``.

        Args:
            name: an object's name.

        Returns:
            ObjectTrack.

        Raises:
            InputError: no object has that name.
        """
        for track in self.objects:
            if track.name == name:
                return track
        raise InputError(f"name: no object {name!r} in this scene (it has {', '.join(self.names)})")

    def event_frames(self, tag: str, obj: int | str = 0) -> list[int]:
        """Frames in which object ``obj`` (index or name) is tagged ``tag``.

        Args:
            tag: "jump", "occluded" or "reappeared".
            obj: object index or name (default 0).

        Returns:
            list of frame indices, ascending.

        Raises:
            InputError: ``obj`` names no object.
        """
        track = self.object(obj) if isinstance(obj, str) else self.objects[obj]
        return track.event_frames(tag)

    def label_image(self, index: int) -> np.ndarray:
        """(H,W) label image of frame ``index``: 0 background, each object's visible pixels at its
        obj_id. Visible masks never overlap.

        Args:
            index: the frame number.

        Returns:
            (H,W) uint8 (uint16 past 255 objects).
        """
        dtype = np.uint8 if len(self.objects) < 256 else np.uint16
        labels = np.zeros((self.height, self.width), dtype)
        for track in self.objects:
            labels[track.masks[index]] = track.obj_id
        return labels

    def save(self, path, layout: str = "ycbineoat", overwrite: bool = False, labels: bool = True) -> Path:
        """Write the scene to ``path`` (atomically: nothing is left behind by a failure).

        layout "ycbineoat": rgb/, depth/ (uint16 mm), cam_K.txt and mesh/<name>.obj per object
        (metres, with colours); one object: masks/<frame>.png and annotated_poses/<frame>.txt as
        before; several: masks/<name>/<frame>.png, annotated_poses/<name>/<frame>.txt and, unless
        labels=False, labels/<frame>.png with labels.json ({name: value}, value = obj_id, see
        label_image). layout "bop": a BOP dataset with scene 000001, one instance per object and
        image, obj_id = ObjectTrack.obj_id (models/obj_000001.ply is the first object).

        Args:
            path: the folder to write.
            layout: "ycbineoat" (default) or "bop".
            overwrite: replace a non-empty folder (default False).
            labels: write label images for a multi-object YCBInEOAT scene (default True).

        Returns:
            Path of the folder.

        Raises:
            InputError: an unknown layout, or ``path`` exists (not empty, or not a folder) without
                overwrite.
        """
        from chunkpose.io.bop_writer import BopGt, BopImage, write_bop, write_bop_dataset
        from chunkpose.io.writers import write_ycbineoat

        if layout not in LAYOUTS:
            raise InputError(f"layout: expected 'ycbineoat' or 'bop', got {layout!r}")
        several = len(self.objects) > 1
        if layout == "ycbineoat":
            meshes = {track.name: track.mesh for track in self.objects}
            if several:
                return write_ycbineoat(
                    path, self.rgb, self.depth, self.K,
                    masks={t.name: t.masks for t in self.objects}, poses={t.name: t.poses for t in self.objects},
                    overwrite=overwrite, meshes=meshes, labels=bool(labels),
                )
            return write_ycbineoat(path, self.rgb, self.depth, self.K, masks=self.masks, poses=self.poses,
                                   overwrite=overwrite, meshes=meshes)
        if not several:
            return write_bop(
                path, self.rgb, self.depth, self.K, self.masks, self.poses, self.mesh,
                full_masks=self.full_masks or None, overwrite=overwrite,
            )
        images = [
            BopImage(self.rgb[i], self.depth[i], self.K,
                     [BopGt(t.obj_id, t.poses[i], t.masks[i], t.full_masks[i]) for t in self.objects])
            for i in range(self.frames)
        ]
        return write_bop_dataset(path, images, {t.obj_id: t.mesh for t in self.objects}, overwrite=overwrite)

    def __repr__(self) -> str:
        objects = f"mesh={self.mesh!r}" if len(self.objects) == 1 else f"objects={self.names}"
        return f"Scene({self.width}x{self.height}, frames={self.frames}, footprint={self.footprint:.3f}, {objects})"
