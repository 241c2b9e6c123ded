"""What the learned networks are fed, pinned rule by rule against upstream's published
behaviour: headlight shading, the default grey, the rendered crop's pixel centres, kornia
0.7.2's sampling offset (numbers measured once with scripts/measure_kornia072.py), the
fp16 positional table, the unnormalised translation update and symmetry clustering."""
import math

import numpy as np
import pytest
import torch
import trimesh

import chunkpose.ops as ops
from chunkpose.io.mesh import DEFAULT_GREY, Mesh, load_mesh
from chunkpose.ops.crops import kornia072_offset, sampling_maps, upstream_render_transforms
from chunkpose.ops.naive import naive_scorer_xyz_crops
from test_ops_common import BACKENDS, look_at_poses, run, synthetic_depth

K = np.array([[500.0, 0.0, 160.0], [0.0, 500.0, 120.0], [0.0, 0.0, 1.0]])


def coordinate_image(H, W):
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.stack([u, v])


def box_transform(left, top, scale):
    return torch.tensor([[[scale, 0.0, -left * scale], [0.0, scale, -top * scale], [0.0, 0.0, 1.0]]])


# kornia 0.7.2 warp_perspective(align_corners=False), bilinear, of an image holding each pixel's
# own column / row: the positions it sampled for crop pixels 0, 1, 80, 159 (measured with
# scripts/measure_kornia072.py; kornia >= 0.7.3 samples left + j / scale exactly).
KORNIA_072 = [
    # (H, W), left, top, scale, x positions, y positions
    ((480, 640), 300.0, 200.0, 1.6, [299.9695, 300.5955, 350.0477, 399.5], [199.9175, 200.5438, 250.0219, 299.5]),
    ((2048, 3072), 1500.0, 900.0, 0.4, [1499.9884, 1502.4893, 1700.0536, 1897.6177],
     [899.9397, 902.4409, 1100.0374, 1297.6339]),
    ((160, 160), 10.0, 20.0, 1.25, [9.5629, 10.3679, 73.9654, 137.5629], [19.6258, 20.4308, 84.0283, 147.6258]),
]


@pytest.mark.parametrize("case", KORNIA_072, ids=["640x480", "3072x2048", "crop-as-source"])
def test_kornia072_sampling_reproduces_the_measured_positions(case):
    (H, W), left, top, scale, xs, ys = case
    out = ops.warp_crops(coordinate_image(H, W), box_transform(left, top, scale), 160, "bilinear",
                         sampling="kornia_0.7.2", source_size=(H, W))
    picks = [0, 1, 80, 159]
    # kornia computed in float32: its positions carry ~1e-4 px of rounding
    np.testing.assert_allclose(out[0, 0, 0, picks].numpy(), xs, atol=3e-4)
    np.testing.assert_allclose(out[0, 1, picks, 0].numpy(), ys, atol=3e-4)
    exact = ops.warp_crops(coordinate_image(H, W), box_transform(left, top, scale), 160, "bilinear")
    np.testing.assert_allclose(exact[0, 0, 0, picks].numpy(), left + np.array(picks) / scale, atol=1e-3)


def test_kornia072_offset_in_closed_form():
    D = kornia072_offset((480, 640))
    p = torch.tensor([300.0, 200.0, 1.0], dtype=torch.float64)
    x, y, _ = (D @ p).tolist()
    assert x == pytest.approx(300 * 640 / 639 - 0.5) and y == pytest.approx(200 * 480 / 479 - 0.5)
    with pytest.raises(ValueError, match="source_size"):
        sampling_maps(box_transform(0, 0, 1.0), 8, None, "kornia_0.7.2")
    with pytest.raises(ValueError, match="sampling"):
        sampling_maps(box_transform(0, 0, 1.0), 8, (4, 4), "kornia_0.7.3")


kornia = pytest.importorskip("kornia")


def test_kornia072_sampling_is_an_exact_warp_under_the_offset_transform():
    """kornia >= 0.7.3 samples exactly; 0.7.2 samples D T^-1 q. So our 0.7.2 sampling must equal
    the current kornia's warp with the transform T D^-1, bilinear and nearest."""
    H, W = 37, 53
    img = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    cw = ops.crop_windows(look_at_poses(5, t=(0.0, 0.0, 0.5), seed=2), np.array([[70.0, 0, 26.1], [0, 70.0, 18.3],
                                                                               [0, 0, 1]]), 0.2, 1.2, size=24)
    shifted = (cw.transforms.double() @ torch.linalg.inv(kornia072_offset((H, W)))).float()
    for mode in ("bilinear", "nearest"):
        ours = ops.warp_crops(img, cw.transforms, 24, mode, sampling="kornia_0.7.2", source_size=(H, W))
        ref = kornia.geometry.transform.warp_perspective(img[None].expand(5, -1, -1, -1), shifted, (24, 24),
                                                         mode=mode, align_corners=False)
        if mode == "bilinear":
            torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
        else:  # float32 noise in kornia flips a few exact ties
            assert (ours == ref).float().mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_scorer_round_trip_with_kornia072_sampling_equals_the_naive_chain(backend):
    depth = synthetic_depth(H=29, W=41, seed=3)
    K_small = np.array([[60.0, 0.0, 20.3], [0.0, 62.0, 14.7], [0.0, 0.0, 1.0]])
    cw = ops.crop_windows(look_at_poses(6, t=(0.0, 0.0, 0.85), seed=5), K_small, 0.25, 1.1, size=16)
    ours = run(backend, ops.xyz_crops, depth, K_small, cw.transforms, 16, "scorer", sampling="kornia_0.7.2",
               source_size=depth.shape)
    naive = naive_scorer_xyz_crops(depth, K_small, cw.transforms, 16, sampling="kornia_0.7.2")
    assert torch.equal(ours, naive)
    exact = ops.xyz_crops(depth, K_small, cw.transforms, 16, "scorer")
    assert not torch.equal(ours, exact)  # the offset moves some nearest picks


def test_upstream_render_transforms_put_crop_pixels_at_upstreams_positions():
    """Upstream's crop box spans the pixel centres 0 and 159: crop pixel j shows the full-image
    u = left + (j + 1/2) (159/160) s (s = crop pixel size)."""
    left, top, s = 100.0, 50.0, 0.625  # 160 px crop of a 100 px box
    T = box_transform(left, top, 1 / s)
    Tr = upstream_render_transforms(T, 160)
    j = torch.tensor([0.0, 1.0, 80.0, 159.0], dtype=torch.float64)
    q = torch.stack([j, j, torch.ones_like(j)])
    p = torch.linalg.inv(Tr[0]) @ q
    expected = (j + 0.5) * (159 / 160) * s
    torch.testing.assert_close(p[0], left + expected)
    torch.testing.assert_close(p[1], top + expected)


def plane_mesh(half=0.5, colour=None):
    """A big square facing the camera (normals towards it) at the object origin."""
    vertices = np.array([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]], float)
    tm = trimesh.Trimesh(vertices, [[0, 2, 1], [0, 3, 2]], process=False)
    if colour is not None:
        tm.visual.vertex_colors = np.tile(np.asarray(colour, np.uint8), (4, 1))
    return tm


def make_mesh(vertices, faces, normals, colours) -> Mesh:
    vertices = np.asarray(vertices, np.float32)
    return Mesh(vertices=vertices, faces=np.asarray(faces, np.int64), vertex_colors=np.asarray(colours, np.float32),
                normals=np.asarray(normals, np.float32), diameter=float(np.ptp(vertices, 0).max()),
                center=np.zeros(3))


def renderer_for(mesh, **kwargs):
    from chunkpose.ops.render import make_renderer

    return make_renderer(mesh, "cpu", backend="gl", **kwargs)


AT = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0.5], [0, 0, 0, 1.0]])


@pytest.mark.gl
def test_uncoloured_mesh_is_trimesh_grey_then_shaded():
    mesh = load_mesh(plane_mesh())
    assert np.allclose(mesh.vertex_colors, 102 / 255) and DEFAULT_GREY[0] == pytest.approx(0.4)
    flat = renderer_for(mesh, shading=False).render_full(AT, K, 320, 240)["rgb"][0, :, 120, 160]
    lit = renderer_for(mesh).render_full(AT, K, 320, 240)["rgb"][0, :, 120, 160]
    np.testing.assert_allclose(flat.numpy(), 0.4, atol=1e-6)
    # facing the light: 0.4 * 0.8 + 1 * 0.4 * 0.5 = 0.52
    np.testing.assert_allclose(lit.numpy(), 0.52, atol=1e-6)


@pytest.mark.gl
@pytest.mark.parametrize("angle_deg", [0.0, 60.0, 90.0, 120.0])
def test_one_lit_triangle_at_a_known_angle(angle_deg):
    """Vertex normals tilted by `angle` from the camera direction: d = clip(cos(angle), 0, 1)
    and rgb = albedo * (0.8 + 0.5 d), clipped to 1."""
    a = math.radians(angle_deg)
    normal = [math.sin(a), 0.0, -math.cos(a)]  # object frame = camera frame (identity rotation)
    albedo = [0.4, 0.8, 1.0]
    tri = make_mesh([[-0.2, -0.2, 0], [0.2, -0.2, 0], [0.0, 0.2, 0]], [[0, 1, 2]], [normal] * 3, [albedo] * 3)
    rgb = renderer_for(tri).render_full(AT, K, 320, 240)["rgb"][0, :, 120, 160].numpy()
    d = max(0.0, math.cos(a))
    np.testing.assert_allclose(rgb, np.minimum(np.array(albedo) * (0.8 + 0.5 * d), 1.0), atol=1e-5)


@pytest.mark.gl
def test_the_light_term_is_interpolated_per_vertex():
    """d per vertex (1, 0, 0 here), interpolated like a colour: at the centroid of a triangle
    parallel to the image d = 1/3 (not the light of the interpolated normal)."""
    v = np.array([[-0.2, -0.15, 0], [0.2, -0.15, 0], [0.0, 0.25, 0]])
    normals = [[0, 0, -1.0], [1.0, 0, 0], [0, 1.0, 0]]
    tri = make_mesh(v, [[0, 1, 2]], normals, [[0.6, 0.6, 0.6]] * 3)
    centroid = v.mean(0) + [0, 0, 0.5]
    u, w = K[0, 0] * centroid[0] / centroid[2] + K[0, 2], K[1, 1] * centroid[1] / centroid[2] + K[1, 2]
    rgb = renderer_for(tri).render_full(AT, K, 320, 240)["rgb"][0, :, int(round(w)), int(round(u))].numpy()
    # the pixel centre is within half a pixel of the centroid: d there is 1/3 to about 1e-2
    np.testing.assert_allclose(rgb, 0.6 * (0.8 + 0.5 / 3), atol=4e-3)


@pytest.mark.gl
def test_rendered_crop_pixels_show_upstreams_points():
    """Through upstream_render_transforms, the rendered xyz of a plane at z = 0.5 at crop pixel
    j back-projects to u = left + (j + 1/2)(159/160)s."""
    mesh = load_mesh(plane_mesh())
    left, top, s = 140.0, 100.0, 0.25
    T = box_transform(left, top, 1 / s)
    xyz = renderer_for(mesh).render_crops(AT[None], K, upstream_render_transforms(T, 160), 160)["xyz"][0]
    j = np.array([0, 1, 80, 159])
    u = K[0, 0] * xyz[0, 5, j].numpy() / xyz[2, 5, j].numpy() + K[0, 2]
    v = K[1, 1] * xyz[1, j, 5].numpy() / xyz[2, j, 5].numpy() + K[1, 2]
    np.testing.assert_allclose(u, left + (j + 0.5) * (159 / 160) * s, atol=2e-3)
    np.testing.assert_allclose(v, top + (j + 0.5) * (159 / 160) * s, atol=2e-3)


def test_positional_table_stays_float32_under_fp16():
    from chunkpose.models.blocks import PositionalEmbedding

    pe = PositionalEmbedding(512, 400)
    x = torch.randn(2, 400, 512).half()
    out = pe(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() + pe.pe)


def test_unnormalised_configs_take_tanh_of_the_translation():
    from chunkpose.models import apply_update

    pose = torch.eye(4)[None]
    trans = torch.tensor([[0.5, -3.0, 10.0]])
    out = apply_update(pose, trans, torch.zeros(1, 3), diameter=0.2, normalize_xyz=False,
                       trans_normalizer=[0.01, 0.02, 0.05])
    torch.testing.assert_close(out[0, :3, 3], torch.tanh(trans[0]) * torch.tensor([0.01, 0.02, 0.05]))
    normalised = apply_update(pose, trans, torch.zeros(1, 3), diameter=0.2)
    torch.testing.assert_close(normalised[0, :3, 3], trans[0] * 0.1)


def test_symmetry_clustering_keeps_252_without_and_fewer_with_symmetries():
    from scipy.spatial.transform import Rotation

    from chunkpose.pipeline.hypotheses import cluster_rotations, rotation_hypotheses

    R = rotation_hypotheses(252, dtype=torch.float64)
    assert len(cluster_rotations(R)) == 252
    # a 180 degree symmetry about the object z axis: every kept pair differs by >= 30 deg mod it
    flip = np.eye(4)
    flip[:3, :3] = Rotation.from_euler("z", 180, degrees=True).as_matrix()
    kept = cluster_rotations(R, [flip])
    assert len(kept) == 126  # each view's flipped twin (in-plane angle + 180 degrees) goes
    # any two kept rotations are >= 30 degrees apart, also after applying the symmetry
    for other in (kept, kept @ torch.as_tensor(flip[:3, :3])):
        cos = (torch.einsum("iab,jab->ij", kept, other) - 1) / 2
        if other is kept:
            cos.fill_diagonal_(-1.0)
        assert float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).min()) >= 30.0 - 1e-6
    # continuous symmetry about z (a cylinder): far fewer
    from chunkpose.io.bop_reader import bop_symmetry_transforms

    cylinder = bop_symmetry_transforms({"symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 0]}]})
    assert cylinder.shape == (72, 4, 4)
    assert len(cluster_rotations(R, cylinder)) < 60


def test_bop_symmetries_combine_discrete_and_continuous_in_metres():
    from chunkpose.io.bop_reader import bop_symmetry_transforms

    disc = np.eye(4)
    disc[:3, :3] = np.diag([-1.0, -1.0, 1.0])
    disc[:3, 3] = [0, 0, 20.0]  # mm
    S = bop_symmetry_transforms({"symmetries_discrete": [disc.ravel().tolist()],
                                 "symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 0]}]},
                                continuous_step_deg=90)
    assert S.shape == (8, 4, 4)
    np.testing.assert_allclose(S[0], np.eye(4))
    assert any(np.allclose(T[:3, 3], [0, 0, 0.02]) for T in S)
    for T in S:
        np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-12)


def test_estimator_clusters_hypotheses_of_a_symmetric_mesh():
    from chunkpose import PoseEstimator

    class NoRenderer:
        device = torch.device("cpu")
        backend = "none"

    box = trimesh.creation.box((0.1, 0.06, 0.04))
    flip = np.eye(4)
    flip[:3, :3] = np.diag([-1.0, -1.0, 1.0])
    plain = PoseEstimator(box, budget_gb=None, device="cpu", renderer=NoRenderer())
    sym = PoseEstimator(box, budget_gb=None, device="cpu", renderer=NoRenderer(), symmetry_tfs=[flip])
    assert len(plain._rotations) == 252 and len(sym._rotations) < 252
    with pytest.raises(ValueError, match="symmetry_tfs"):
        PoseEstimator(box, budget_gb=None, device="cpu", renderer=NoRenderer(), symmetry_tfs=[np.ones((4, 4))])
