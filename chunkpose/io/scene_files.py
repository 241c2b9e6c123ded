"""The file-level half of the scene readers: the Frame they hand out, reading one image,
depth map, mask, K or pose file with a clear SceneError, and the resize / zfar handling
both layouts share.

Frames are in chunkpose conventions: rgb uint8 (H,W,3), depth float32 metres (H,W) with
0 = invalid, mask bool (H,W) or None, K float64 (3,3), ground-truth pose float64 (4,4) in
metres or None. Like the upstream reader, ``downscale`` (or ``shorter_side``) resizes with
nearest-neighbour sampling (so depth and masks never blend across edges) and scales the
first two rows of K; depth at or beyond ``zfar`` becomes 0.

Every problem with the input raises :class:`SceneError`, whose message says what is wrong
and how to fix it; the command line prints it as one line.

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from chunkpose.errors import InputError
from chunkpose.ops.geometry import MIN_DEPTH, scale_intrinsics, scaled_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Depth may be found stored as floats by mistake (.tif/.exr/.npy); we look for those too so
# that we can say precisely what is wrong instead of "file not found".
DEPTH_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
# A real RGB-D scene has its valid depths well above 1 cm. A median below this (after the
# depth scale) means metres were written as integers, not millimetres.
_MIN_PLAUSIBLE_MEDIAN_MM = 10


class SceneError(InputError):
    """Bad scene input. ``str(err)`` is ``"<what> (<how to fix>)"``.

    Args:
        what: what is wrong (names the file or value).
        fix: how to fix it.

    Attributes:
        what: the ``what`` text.
        fix: the ``fix`` text.
    """

    def __init__(self, what: str, fix: str):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} ({fix})")


@dataclass
class Frame:
    """One RGB-D frame.

    Attributes:
        name: file stem ("000123"), used for output file names.
        rgb: (H,W,3) uint8 RGB.
        depth: (H,W) float32 metres, 0 = invalid.
        K: (3,3) float64 intrinsics in pixels for the (possibly downscaled) images.
        mask: (H,W) bool object mask, or None.
        gt_pose: (4,4) float64 ground-truth object-in-camera pose in metres, or None.
        extra: dict of reader-specific values; "resize_factor" (float) is always set by the
            readers.
    """

    name: str
    rgb: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    mask: np.ndarray | None = None
    gt_pose: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.rgb.shape[:2]


def resize_factor(height: int, width: int, downscale: float | None, shorter_side: int | None) -> float:
    """The factor applied to both image axes: shorter_side wins over downscale.

    Args:
        height: native image height in pixels.
        width: native image width in pixels.
        downscale: factor for both axes, or None (1.0).
        shorter_side: target length in pixels of the shorter side, or None.

    Returns:
        float factor (1.0 when neither is given).

    Raises:
        SceneError: ``shorter_side`` or ``downscale`` is not positive (or not finite).
    """
    if shorter_side is not None:
        if shorter_side <= 0:
            raise SceneError(f"shorter_side must be positive, got {shorter_side}", "pass e.g. --shorter-side 480")
        return float(shorter_side) / float(min(height, width))
    if downscale is None:
        return 1.0
    if not math.isfinite(downscale) or downscale <= 0:
        raise SceneError(f"downscale must be a positive number, got {downscale}", "pass e.g. --downscale 0.5")
    return float(downscale)


def resize_nearest(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``size_hw`` with nearest-neighbour sampling (bool images stay bool).

    Args:
        image: (H,W) or (H,W,C) numpy array.
        size_hw: target (h, w) in pixels.

    Returns:
        (h,w[,C]) array of the image's dtype; the image itself when the size already matches.
    """
    if image.shape[:2] == tuple(size_hw):
        return image
    h, w = size_hw
    if image.dtype == bool:
        return cv2.resize(image.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST)


def listed(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted by name, without hidden ones (names starting with '.':
    macOS' ._ files, .ipynb_checkpoints), which upstream's glob skips too.

    Args:
        folder: an existing folder.

    Returns:
        list of Path.
    """
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))


def find_file(folder: Path, stem: str, extensions) -> Path | None:
    """The first ``folder/<stem><ext>`` that exists, trying ``extensions`` in order.

    Args:
        folder: the folder to look in.
        stem: the file name without extension.
        extensions: extensions with the dot, e.g. (".png", ".jpg").

    Returns:
        Path, or None when none exists.
    """
    for ext in extensions:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def read_image_file(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """cv2.imread that raises SceneError instead of returning None.

    Args:
        path: the image file.
        flags: cv2.imread flags (default IMREAD_UNCHANGED).

    Returns:
        numpy array as cv2 reads it (BGR channel order for colour).

    Raises:
        SceneError: the file is missing or cannot be read as an image.
    """
    if not Path(path).is_file():
        raise SceneError(f"image not found: {path}", "check the scene folder")
    image = cv2.imread(str(path), flags)
    if image is None or image.size == 0:
        raise SceneError(f"cannot read image {path}", "the file is damaged or not an image; re-export it as PNG")
    return image


def read_rgb_file(path: Path) -> np.ndarray:
    """(H,W,3) uint8 RGB from a colour, grey or 16-bit image file.

    Args:
        path: the image file (16-bit values are divided by 257, grey is repeated, alpha dropped).

    Returns:
        (H,W,3) uint8 contiguous RGB array.

    Raises:
        SceneError: the file is missing, unreadable, or of another pixel type.
    """
    image = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SceneError(f"colour image {path} has pixel type {image.dtype}", "save colour images as 8-bit PNG or JPEG")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def read_depth_file(path: Path, metres_per_unit: float) -> np.ndarray:
    """(H,W) float32 metres from an integer depth image of ``metres_per_unit`` per raw unit.

    Depth stored as floats (metres) is refused with a message rather than silently read with
    the wrong unit: the upstream reader would divide it by 1000 again.

    Args:
        path: a single-channel integer image (16-bit PNG) or .npy file.
        metres_per_unit: metres per raw unit (0.001 for millimetres).

    Returns:
        (H,W) float32 depth in metres (0 where the raw value is 0).

    Raises:
        SceneError: the file is missing or unreadable, has several channels, holds floats or
            8-bit values, or its median looks like metres stored as integers.
    """
    path = Path(path)
    if path.suffix == ".npy":
        try:
            raw = np.load(path)
        except Exception:
            raise SceneError(f"cannot read depth {path}", "store depth as 16-bit PNG in millimetres") from None
    else:
        raw = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if raw.ndim == 3:
        if raw.shape[2] == 1 or np.array_equal(raw[..., 0], raw[..., -1]):
            raw = raw[..., 0]
        else:
            raise SceneError(f"depth image {path} has {raw.shape[2]} channels", "store depth as a single-channel 16-bit PNG in millimetres")
    if np.issubdtype(raw.dtype, np.floating):
        raise SceneError(
            f"depth {path.name} is stored as {raw.dtype} (metres?) where uint16 millimetres were expected",
            "convert it: (depth_m * 1000).astype(np.uint16) and save as 16-bit PNG",
        )
    if raw.dtype == np.uint8:
        raise SceneError(f"depth {path.name} is an 8-bit image", "store depth as a 16-bit PNG in millimetres (uint16)")
    valid = raw[raw > 0]
    if valid.size and np.median(valid) * metres_per_unit * 1000 < _MIN_PLAUSIBLE_MEDIAN_MM:
        raise SceneError(
            f"depth {path.name} looks like metres stored as integers (median raw value {np.median(valid):g})",
            "store depth in millimetres: (depth_m * 1000).astype(np.uint16)",
        )
    return raw.astype(np.float32) * np.float32(metres_per_unit)


def read_mask_file(path: Path) -> np.ndarray:
    """(H,W) bool: the non-zero pixels of a grey mask, or of a colour mask's first colour
    channel (B, G, R order, as upstream's reader) that marks any pixel.

    An alpha channel is transparency, not the mask: it is ignored (an opaque alpha would mark
    the whole frame), unless no colour channel marks anything, as in a cut-out whose colour is
    black everywhere and whose alpha holds the object.

    Args:
        path: the mask image file.

    Returns:
        (H,W) bool array.

    Raises:
        SceneError: the file is missing or unreadable.
    """
    mask = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 2:
        return mask > 0
    colour = [mask[..., c] for c in range(min(3, mask.shape[2]))]
    marked = next((c for c in colour if c.any()), None)
    if marked is None and mask.shape[2] == 4:
        alpha = mask[..., 3]
        marked = alpha if alpha.min() != alpha.max() else None
    return (colour[0] if marked is None else marked) > 0


def _text_numbers(path: Path) -> np.ndarray:
    """The numbers of a text file as np.loadtxt (upstream's reader) reads them: split by
    whitespace, '#' starts a comment. Raises ValueError on anything else."""
    text = "\n".join(line.split("#", 1)[0] for line in Path(path).read_text().splitlines())
    return np.array(text.split(), dtype=np.float64)


def read_intrinsics_file(path: Path) -> np.ndarray:
    """K (3,3) from a whitespace-separated text file (cam_K.txt).

    Args:
        path: text file of 9 numbers, row-major, pixels.

    Returns:
        (3,3) float64 array.

    Raises:
        SceneError: the file is missing, unparsable, does not hold 9 finite numbers, or has
            non-positive focal lengths.
    """
    if not Path(path).is_file():
        raise SceneError(f"missing {path}", "the scene needs cam_K.txt with the 3x3 camera matrix in pixels")
    try:
        values = _text_numbers(path)
    except ValueError:
        raise SceneError(f"cannot parse {path}", "it must hold 9 numbers: the 3x3 camera matrix") from None
    if values.size != 9 or not np.all(np.isfinite(values)):
        raise SceneError(f"{path} holds {values.size} numbers", "it must hold 9 numbers: the 3x3 camera matrix")
    K = values.reshape(3, 3)
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise SceneError(f"{path} has non-positive focal lengths", "check the camera matrix (fx at [0,0], fy at [1,1])")
    return K


def read_pose_file(path: Path) -> np.ndarray:
    """(4,4) float64 from a whitespace-separated text file.

    Args:
        path: text file of 16 numbers (or 12: the top 3x4 rows), row-major, translation in metres.

    Returns:
        (4,4) float64 array.

    Raises:
        SceneError: the file cannot be parsed or holds another number of values.
    """
    try:
        values = _text_numbers(path)
    except ValueError:
        raise SceneError(f"cannot parse pose {path}", "it must hold 16 numbers: a 4x4 matrix in metres") from None
    if values.size == 12:
        values = np.concatenate([values, [0, 0, 0, 1]])
    if values.size != 16:
        raise SceneError(f"pose {path} holds {values.size} numbers", "it must hold 16 numbers: a 4x4 matrix in metres")
    return values.reshape(4, 4)


def match_rgb_size(name: str, what: str, image: np.ndarray, expected) -> np.ndarray:
    """``image`` at the rgb image's size: as it is, or resized with nearest sampling when only
    its resolution differs (upstream's reader resizes depth and mask to the colour image, whose
    K cam_K.txt gives), with a warning.

    Args:
        name: the frame's name, for the message.
        what: which image ("depth", "mask").
        image: (H,W[,C]) array.
        expected: the rgb image's shape.

    Returns:
        (H_rgb,W_rgb[,C]) array.

    Raises:
        SceneError: the aspect ratios differ (by more than a pixel at the rgb size): not the
            same view, most likely a wrong file.
    """
    (h, w), (H, W) = image.shape[:2], tuple(expected[:2])
    if (h, w) == (H, W):
        return image
    if abs(w * H / h - W) > 1.0:
        raise SceneError(
            f"frame {name}: {what} is {w}x{h} but rgb is {W}x{H}, another aspect ratio",
            "rgb, depth and mask of a frame must show the same view (the same size, or one resized)",
        )
    warnings.warn(f"{what} images are {w}x{h} but rgb is {W}x{H}: {what} resized to the rgb size "
                  "(nearest), as upstream's reader does", stacklevel=2)
    return resize_nearest(image, (H, W))


def apply_zfar(depth: np.ndarray, zfar: float | None) -> np.ndarray:
    """``depth`` with non-finite values, values below MIN_DEPTH and (with ``zfar``) values at or
    beyond ``zfar`` set to 0.

    Args:
        depth: (H,W) float depth in metres.
        zfar: far limit in metres, or None.

    Returns:
        (H,W) array: a copy when anything changed, else ``depth`` itself.
    """
    bad = ~np.isfinite(depth) | (depth < MIN_DEPTH)
    if zfar is not None:
        bad |= depth >= zfar
    if bad.any():
        depth = depth.copy()
        depth[bad] = 0
    return depth


class ResizingReader:
    """Shared resize / zfar handling; subclasses load raw frames at native size.

    Args:
        downscale: factor for both image axes, or None.
        shorter_side: target shorter side in pixels (wins over downscale), or None.
        zfar: depth at or beyond this many metres becomes 0; None = no limit.

    Raises:
        SceneError: ``zfar`` is not positive.
    """

    def __init__(self, downscale: float | None = None, shorter_side: int | None = None, zfar: float | None = None):
        if zfar is not None and not zfar > 0:
            raise SceneError(f"zfar must be positive, got {zfar}", "pass e.g. --zfar 3.0 (metres)")
        self.downscale = downscale
        self.shorter_side = shorter_side
        self.zfar = zfar if zfar is not None else math.inf

    def _finish(self, name, rgb, depth, K, mask, gt_pose=None, extra=None) -> Frame:
        H, W = rgb.shape[:2]
        depth = match_rgb_size(name, "depth", depth, rgb.shape)
        if mask is not None:
            mask = match_rgb_size(name, "mask", mask, rgb.shape)
        factor = resize_factor(H, W, self.downscale, self.shorter_side)
        if factor != 1.0:
            size = scaled_size(H, W, factor)
            rgb = resize_nearest(rgb, size)
            depth = resize_nearest(depth, size)
            mask = None if mask is None else resize_nearest(mask, size)
            K = scale_intrinsics(K, factor)
        depth = apply_zfar(depth, self.zfar)
        extra = dict(extra or {})
        extra["resize_factor"] = factor
        return Frame(name=name, rgb=rgb, depth=depth.astype(np.float32, copy=False), K=np.asarray(K, np.float64),
                     mask=mask, gt_pose=gt_pose, extra=extra)


def load_json(path: Path, fix: str):
    """The parsed JSON of ``path``.

    Args:
        path: the JSON file.
        fix: how to fix a missing file, for the SceneError's message.

    Returns:
        The decoded JSON value.

    Raises:
        SceneError: the file is missing or not valid JSON.
    """
    if not path.is_file():
        raise SceneError(f"missing {path}", fix)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SceneError(f"cannot parse {path}: {err.msg if hasattr(err, 'msg') else err}", "it must be valid JSON") from None


__all__ = [
    "Frame", "ResizingReader", "SceneError", "load_json", "read_depth_file", "read_image_file",
    "read_intrinsics_file", "read_mask_file", "read_pose_file", "read_rgb_file", "resize_factor",
]
