"""Renderer tests: analytic depth/xyz of a plane and a box, crop renders against windows of
full-frame renders, textures, the engine path, backend selection."""
import numpy as np
import pytest
import torch
import trimesh
from scipy.ndimage import binary_erosion
from scipy.spatial.transform import Rotation

from chunkpose.io.mesh import load_mesh
from chunkpose.ops.render import make_renderer

K = np.array([[300.0, 0.0, 159.3], [0.0, 310.0, 121.7], [0.0, 0.0, 1.0]])
W, H = 320, 240


def pose_of(rotvec, t):
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    pose[:3, 3] = t
    return pose


def crop_transform(left, top, right, bottom, size):
    """Full-image pixel -> crop pixel, the box_3d convention of the pipeline."""
    scale = np.diag([size / (right - left), size / (bottom - top), 1.0])
    shift = np.array([[1.0, 0, -left], [0, 1.0, -top], [0, 0, 1.0]])
    return scale @ shift


def pixel_rays(K, width, height):
    """Camera-frame rays (H,W,3) with z = 1 through pixel centres at integer coordinates."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)
    return pix @ np.linalg.inv(K).T


def zoomed_rays(K, transform, size):
    rays = pixel_rays(np.asarray(transform) @ K, size, size)
    return rays / rays[..., 2:3]


def box_raycast(pose, extents, rays):
    """Analytic hit depth (H,W) (0 = miss) and hit face id (H,W) (-1 = miss) of a box."""
    R, t = pose[:3, :3], pose[:3, 3]
    origin = -R.T @ t
    dirs = rays @ R  # object-frame directions (R^T d)
    half = np.asarray(extents) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - origin) / dirs
        t2 = (half - origin) / dirs
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    enter = np.nanmax(tmin, axis=-1)
    leave = np.nanmin(tmax, axis=-1)
    hit = (enter <= leave) & (enter > 0)
    face = np.argmax(np.nan_to_num(tmin, nan=-np.inf), axis=-1)
    side = np.take_along_axis(t1 < t2, face[..., None], axis=-1)[..., 0]
    face_id = np.where(hit, face * 2 + side, -1)
    depth = np.where(hit, enter * rays[..., 2], 0.0)  # rays have z = 1 -> camera z = s
    return depth, face_id


def interior(face_id):
    """Pixels whose 3x3 neighbourhood hits the same face (away from edges and silhouettes)."""
    same = face_id >= 0
    padded = np.pad(face_id, 1, constant_values=-2)
    for dy in range(3):
        for dx in range(3):
            same &= padded[dy : dy + face_id.shape[0], dx : dx + face_id.shape[1]] == face_id
    return same


@pytest.fixture(scope="module")
def box_mesh():
    extents = (0.12, 0.08, 0.05)
    tm = trimesh.creation.box(extents)
    tm.unmerge_vertices()  # per-face vertices: vertex normals are face normals
    return extents, load_mesh(tm)


@pytest.fixture(scope="module")
def box_renderer(box_mesh):
    return make_renderer(box_mesh[1], "cpu", backend="gl")


BOX_POSE = pose_of([0.5, -0.7, 0.3], [0.02, -0.01, 0.45])


@pytest.mark.gl
def test_plane_depth_and_xyz_are_analytic():
    # a 1 m square, tilted, at about 1.2 m: z at pixel (u,v) is c / (n . K^-1 (u,v,1))
    vertices = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]])
    plane = load_mesh(trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], process=False))
    pose = pose_of([0.4, 0.3, 0.1], [0.05, 0.02, 1.2])
    out = make_renderer(plane, backend="gl").render_full(pose, K, W, H)
    normal = pose[:3, 2]
    offset = normal @ pose[:3, 3]
    rays = pixel_rays(K, W, H)
    expected = offset / (rays @ normal)
    mask = out["mask"][0].numpy()
    inside = binary_erosion(mask, iterations=2)
    assert inside.sum() > 0.5 * W * H
    depth = out["depth"][0].numpy()
    assert np.abs(depth[inside] - expected[inside]).max() < 1e-4
    xyz = out["xyz"][0].permute(1, 2, 0).numpy()
    assert np.abs(xyz[inside] - (expected[..., None] * rays)[inside]).max() < 1e-4
    assert (depth[~mask] == 0).all()


@pytest.mark.gl
def test_box_depth_xyz_normals_are_analytic(box_mesh, box_renderer):
    extents, _ = box_mesh
    out = box_renderer.render_full(BOX_POSE, K, W, H)
    rays = pixel_rays(K, W, H)
    expected, face_id = box_raycast(BOX_POSE, extents, rays)
    inside = interior(face_id)
    assert inside.sum() > 1000 and len(np.unique(face_id[inside])) >= 2
    depth = out["depth"][0].numpy()
    assert np.abs(depth[inside] - expected[inside]).max() < 1e-4
    xyz = out["xyz"][0].permute(1, 2, 0).numpy()
    assert np.abs(xyz[inside] - (expected[..., None] * rays)[inside]).max() < 1e-4
    # normals: face normals in the camera frame, pointing at the camera
    normals = out["normals"][0].permute(1, 2, 0).numpy()[inside]
    axis, sign = face_id[inside] // 2, np.where(face_id[inside] % 2 == 1, -1.0, 1.0)
    expected_normals = (BOX_POSE[:3, :3][:, axis] * sign).T
    assert np.abs(normals - expected_normals).max() < 1e-4
    # the mask is the analytic silhouette, up to pixels whose centre is on an edge
    mask = out["mask"][0].numpy()
    assert (mask != (face_id >= 0)).mean() < 0.002


@pytest.mark.gl
def test_crop_depth_is_analytic_under_zoom(box_mesh, box_renderer):
    extents, _ = box_mesh
    size = 96
    transforms = np.stack(
        [
            crop_transform(110.5, 70.25, 210.5, 170.25, size),  # zoom ~1
            crop_transform(150.0, 100.0, 180.0, 130.0, size),  # zoom 3.2: a part of the box
            crop_transform(-40.0, -60.0, 360.0, 340.0, size),  # zoom out beyond the image
        ]
    )
    poses = np.stack([BOX_POSE] * 3)
    out = box_renderer.render_crops(poses, K, transforms, size)
    assert out["depth"].shape == (3, size, size) and out["xyz"].shape == (3, 3, size, size)
    for b in range(3):
        rays = zoomed_rays(K, transforms[b], size)
        expected, face_id = box_raycast(BOX_POSE, extents, rays)
        inside = interior(face_id)
        assert inside.sum() > 100
        depth = out["depth"][b].numpy()
        assert np.abs(depth[inside] - expected[inside]).max() < 1e-4
        xyz = out["xyz"][b].permute(1, 2, 0).numpy()
        assert np.abs(xyz[inside] - (expected[..., None] * rays)[inside]).max() < 1e-4


@pytest.mark.gl
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_crop_equals_window_of_full_render(box_renderer, scale):
    # crop pixel q samples full-image point T^-1 q = q / scale + (left, top): with these
    # scales and integer offsets every crop pixel centre is a full-image pixel centre
    size = 64
    full = box_renderer.render_full(BOX_POSE, K, W, H)
    half = int(size / scale / 2)
    lefts_tops = [(172 - half, 112 - half), (150 - half, 130 - half), (190 - half, 95 - half)]
    transforms = np.stack(
        [crop_transform(l, t, l + size / scale, t + size / scale, size) for l, t in lefts_tops]
    )
    crops = box_renderer.render_crops(np.stack([BOX_POSE] * 3), K, transforms, size)
    q = np.arange(size)
    for b, (left, top) in enumerate(lefts_tops):
        cols = np.round(q / scale + left).astype(int)
        rows = np.round(q / scale + top).astype(int)
        valid_c, valid_r = (cols >= 0) & (cols < W), (rows >= 0) & (rows < H)
        window_mask = np.zeros((size, size), bool)
        window_depth = np.zeros((size, size), np.float32)
        rr, cc = np.ix_(rows[valid_r], cols[valid_c])
        window_mask[np.ix_(valid_r, valid_c)] = full["mask"][0].numpy()[rr, cc]
        window_depth[np.ix_(valid_r, valid_c)] = full["depth"][0].numpy()[rr, cc]
        crop_mask = crops["mask"][b].numpy()
        assert crop_mask.sum() > 50
        assert (crop_mask == window_mask).mean() > 0.995
        both = crop_mask & window_mask
        assert np.abs(crops["depth"][b].numpy()[both] - window_depth[both]).max() < 1e-5
        rgb_crop = crops["rgb"][b].numpy()[:, both]
        rgb_full = full["rgb"][0].numpy()[:, rr, cc][:, both[np.ix_(valid_r, valid_c)]]
        assert np.abs(rgb_crop - rgb_full).max() < 2 / 255


@pytest.mark.gl
def test_crop_equals_bilinear_resampled_full_render(box_renderer):
    # a general crop (fractional scale and offset): the full render resampled bilinearly at
    # T^-1 q agrees with the crop where all four neighbours are on the same face
    size = 80
    full = box_renderer.render_full(BOX_POSE, K, W, H)
    T = crop_transform(101.3, 62.7, 219.9, 181.3, size)
    crop = box_renderer.render_crops(BOX_POSE[None], K, T[None], size)
    q = np.stack([*np.meshgrid(np.arange(size), np.arange(size)), np.ones((size, size))], -1)
    p = q.reshape(-1, 3) @ np.linalg.inv(T).T
    x, y = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    depth_full = full["depth"][0].numpy()
    _, face_id = box_raycast(BOX_POSE, (0.12, 0.08, 0.05), pixel_rays(K, W, H))
    corners = [(0, 0), (1, 0), (0, 1), (1, 1)]
    same = np.ones(len(x), bool)
    for dx, dy in corners:
        same &= (face_id[y0 + dy, x0 + dx] == face_id[y0, x0]) & (face_id[y0, x0] >= 0)
    resampled = sum(
        depth_full[y0 + dy, x0 + dx] * np.where(dx, fx, 1 - fx) * np.where(dy, fy, 1 - fy) for dx, dy in corners
    )
    crop_depth = crop["depth"][0].numpy().reshape(-1)
    assert same.sum() > 1000
    # bilinear interpolation of z over a plane is exact to second order: < 0.1 mm here
    assert np.abs(crop_depth[same] - resampled[same]).max() < 1e-4
    crop_mask = crop["mask"][0].numpy().reshape(-1)
    nearest = full["mask"][0].numpy()[np.round(y).astype(int), np.round(x).astype(int)]
    assert (crop_mask == nearest).mean() > 0.97


@pytest.mark.gl
def test_texture_orientation_matches_vertex_colours():
    # texture: top half red, bottom half green; uv v = 0 is the image's bottom row
    tex = np.zeros((64, 64, 3), np.uint8)
    tex[:32, :, 0] = 255
    tex[32:, :, 1] = 255
    vertices = np.array([[-0.1, -0.1, 0], [0.1, -0.1, 0], [0.1, 0.1, 0], [-0.1, 0.1, 0]])
    uv = (vertices[:, :2] + 0.1) / 0.2
    from PIL import Image

    visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(tex))
    quad = trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False)
    mesh = load_mesh(quad)
    assert mesh.has_texture
    out = make_renderer(mesh, backend="gl", shading=False).render_full(pose_of([0, 0, 0], [0, 0, 0.5]), K, W, H)
    rgb = out["rgb"][0].numpy()
    # object +y (v = 1, the texture's top, red) is camera +y: the image's lower half
    lower, upper = rgb[:, int(K[1, 2]) + 30, int(K[0, 2])], rgb[:, int(K[1, 2]) - 30, int(K[0, 2])]
    assert lower[0] > 0.9 and lower[1] < 0.1
    assert upper[1] > 0.9 and upper[0] < 0.1
    # the baked vertex colours agree with the texture at the corners
    assert np.allclose(mesh.vertex_colors[2], [1, 0, 0], atol=0.02)


class ChunkingEngine:
    """Minimal stand-in for chunkpose.Engine.map: slices positional tensors on axis 0."""

    def __init__(self, chunk):
        self.chunk = chunk
        self.calls = []

    def map(self, op, *mapped, name, per_item_bytes=None, fixed_bytes=None, **kwargs):
        self.calls.append((name, per_item_bytes))
        parts = [op(*(m[i : i + self.chunk] for m in mapped), **kwargs) for i in range(0, len(mapped[0]), self.chunk)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


@pytest.mark.gl
def test_render_crops_through_engine_equals_direct(box_renderer):
    rng = np.random.default_rng(0)
    count, size = 11, 48
    poses = np.stack([pose_of(rng.normal(size=3), [0.0, 0.0, 0.5]) for _ in range(count)])
    transforms = np.stack([crop_transform(100, 60, 220, 180, size)] * count)
    direct = box_renderer.render_crops(torch.as_tensor(poses), K, transforms, size)
    engine = ChunkingEngine(chunk=4)
    chunked = box_renderer.render_crops(poses, torch.as_tensor(K), torch.as_tensor(transforms), size, engine=engine)
    assert engine.calls and engine.calls[0][0] == "render.crops"
    # a crop's tile position in the framebuffer depends on the slicing; rasterisation is
    # translation invariant up to float rounding of interpolated attributes
    for key in direct:
        assert chunked[key].shape == direct[key].shape
    assert (chunked["mask"] == direct["mask"]).float().mean() > 0.999
    both = chunked["mask"] & direct["mask"]
    for key in ("depth", "xyz", "normals", "rgb"):
        assert torch.allclose(chunked[key], direct[key], atol=2e-5), key
    assert (chunked["depth"][both] > 0).all()


@pytest.mark.gl
def test_render_crops_with_real_engine(box_renderer):
    engine_module = pytest.importorskip("chunkpose.engine")
    if not hasattr(engine_module, "Engine"):
        pytest.skip("chunkpose.Engine not built yet")
    engine = engine_module.Engine(budget_gb=1.0, device="cpu")
    size = 40
    poses = np.stack([BOX_POSE] * 5)
    transforms = np.stack([crop_transform(100, 60, 220, 180, size)] * 5)
    out = box_renderer.render_crops(poses, K, transforms, size, engine=engine)
    direct = box_renderer.render_crops(poses, K, transforms, size)
    assert torch.allclose(out["depth"], direct["depth"], atol=2e-5)
    assert (out["mask"] == direct["mask"]).float().mean() > 0.999


@pytest.mark.gl
def test_many_crops_in_several_passes_match_single_renders(box_renderer, monkeypatch):
    """Several atlas passes, tiles that do not leak into each other, and any slicing of a
    batch renders bitwise alike (the engine's chunked-equals-unchunked contract)."""
    import chunkpose.ops.render.gl as gl

    monkeypatch.setattr(gl, "ATLAS_SIDE", 100)  # 3 x 3 crops of 32 px per pass
    size = 32
    rng = np.random.default_rng(1)
    count = 23
    poses = np.stack([pose_of(rng.normal(size=3), [0.0, 0.0, 0.35]) for _ in range(count)])
    transforms = np.stack([crop_transform(120, 80, 200, 160, size)] * count)  # object overflows
    batch = box_renderer.render_crops(poses, K, transforms, size)
    assert len(gl.tile_passes(poses, transforms, 9)) >= 3
    for b in (0, 7, 22):
        single = box_renderer.render_crops(poses[b : b + 1], K, transforms[b : b + 1], size)
        for key in single:
            assert torch.equal(single[key][0], batch[key][b]), key
    chunks = [box_renderer.render_crops(poses[i : i + 5], K, transforms[i : i + 5], size) for i in range(0, count, 5)]
    for key in batch:
        assert torch.equal(torch.cat([chunk[key] for chunk in chunks]), batch[key]), key


@pytest.mark.gl
def test_empty_batch_and_bad_input(box_renderer):
    out = box_renderer.render_crops(np.zeros((0, 4, 4)), K, np.zeros((0, 3, 3)), 16)
    assert out["rgb"].shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="transforms"):
        box_renderer.render_crops(np.stack([BOX_POSE] * 2), K, np.eye(3)[None], 16)
    with pytest.raises(ValueError, match="K"):
        box_renderer.render_full(BOX_POSE, np.eye(4), W, H)
    with pytest.raises(ValueError, match="size"):
        box_renderer.render_crops(BOX_POSE[None], K, np.eye(3)[None], 0)


def test_forcing_unavailable_backend_is_a_clear_error(box_mesh):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="nvdiffrast.*CUDA"):
        make_renderer(box_mesh[1], "cpu", backend="nvdiffrast")
    with pytest.raises(ValueError, match="backend"):
        make_renderer(box_mesh[1], "cpu", backend="vulkan")


@pytest.mark.gl
def test_automatic_choice_on_cpu_is_gl(box_mesh):
    assert make_renderer(box_mesh[1], "cpu").backend == "gl"


@pytest.mark.nvdiffrast
def test_nvdiffrast_agrees_with_gl(box_mesh):
    _, mesh = box_mesh
    gl_renderer = make_renderer(mesh, "cuda", backend="gl")
    nv_renderer = make_renderer(mesh, "cuda", backend="nvdiffrast")
    rng = np.random.default_rng(2)
    count, size = 64, 160
    poses = np.stack([pose_of(rng.normal(size=3), [rng.normal() * 0.02, rng.normal() * 0.02, 0.5]) for _ in range(count)])
    transforms = np.stack([crop_transform(90 + rng.uniform(-5, 5), 50, 230, 190, size) for _ in range(count)])
    a = gl_renderer.render_crops(poses, K, transforms, size)
    b = nv_renderer.render_crops(poses, K, transforms, size)
    for key in a:
        assert a[key].device.type == "cuda" and b[key].device.type == "cuda"
    assert (a["mask"] == b["mask"]).float().mean() >= 0.99
    both = a["mask"] & b["mask"]
    assert (a["depth"][both] - b["depth"][both]).abs().max() < 1e-3
    full_a = gl_renderer.render_full(BOX_POSE, K, 3072, 2048)
    full_b = nv_renderer.render_full(BOX_POSE, K, 3072, 2048)
    assert (full_a["mask"] == full_b["mask"]).float().mean() >= 0.99


@pytest.mark.nvdiffrast
def test_nvdiffrast_analytic_box(box_mesh):
    extents, mesh = box_mesh
    out = make_renderer(mesh, "cuda", backend="nvdiffrast").render_full(BOX_POSE, K, W, H)
    expected, face_id = box_raycast(BOX_POSE, extents, pixel_rays(K, W, H))
    inside = interior(face_id)
    depth = out["depth"][0].cpu().numpy()
    assert np.abs(depth[inside] - expected[inside]).max() < 1e-4


@pytest.mark.gl
def test_crop_render_matches_warp_crops_of_full_render(box_renderer):
    # the convention shared with chunkpose.ops.warp: crop pixel q samples T^-1 q of the full
    # image. With integer offsets and scales 1 and 1/2, T^-1 q is a full-image pixel centre,
    # so nearest warping of the full render must give the crop render; a half-pixel shift
    # in either op would pick a neighbour and miss by ~1 mm on these tilted faces.
    warp = pytest.importorskip("chunkpose.ops.warp")
    size = 64
    full = box_renderer.render_full(BOX_POSE, K, W, H)
    transforms = np.stack([crop_transform(140, 80, 140 + size, 80 + size, size), crop_transform(108, 50, 108 + 2 * size, 50 + 2 * size, size)])
    crops = box_renderer.render_crops(np.stack([BOX_POSE] * 2), K, transforms, size)
    T = torch.as_tensor(transforms, dtype=torch.float32)
    warped_mask = warp.warp_crops(full["mask"].float(), T, size, mode="nearest")[:, 0] > 0.5
    warped_depth = warp.warp_crops(full["depth"], T, size, mode="nearest")[:, 0]
    for b in range(2):
        assert (crops["mask"][b] == warped_mask[b]).float().mean() > 0.995
        both = crops["mask"][b] & warped_mask[b]
        assert both.sum() > 500
        assert (crops["depth"][b] - warped_depth[b]).abs()[both].max() < 1e-5
