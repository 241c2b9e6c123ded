"""What the command writes: atomic output folders, the BOP CSV, overlays, debug clouds/meshes."""
import numpy as np
import pytest

import trimesh

from chunkpose.io.debug import depth_to_points, write_mesh_at_pose, write_scene_raw
from chunkpose.io.results import OutputDir, OutputFolderError, bop_csv_row, read_bop_csv, to_jsonable, write_bop_csv
from chunkpose.vis import box_corners, crop_grid, overlay


def test_output_dir_appears_only_on_commit(tmp_path):
    final = tmp_path / "out"
    od = OutputDir(final)
    with od as tmp:
        (tmp / "a.txt").write_text("x")
        assert not final.exists()
        od.commit()
    assert (final / "a.txt").read_text() == "x"
    with pytest.raises(RuntimeError):
        with OutputDir(tmp_path / "other") as tmp:
            (tmp / "b.txt").write_text("y")
            raise RuntimeError("boom")
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_dir_refuses_foreign_folders(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputFolderError, match="not empty"):
        OutputDir(tmp_path / "keep")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        OutputDir(tmp_path / "file")


def test_bop_csv_row_is_row_major_R_and_t_in_mm(tmp_path):
    pose = np.eye(4)
    pose[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    pose[:3, 3] = [0.1, -0.02, 0.75]
    path = write_bop_csv(tmp_path / "r.csv", [bop_csv_row(3, 12, 5, 0.7, pose, 1.25)])
    assert path.read_text().splitlines()[0] == "scene_id,im_id,obj_id,score,R,t,time"
    row = read_bop_csv(path)[0]
    np.testing.assert_allclose(row["R"], pose[:3, :3])
    np.testing.assert_allclose(row["t"], [100.0, -20.0, 750.0])
    assert (row["scene_id"], row["im_id"], row["obj_id"], row["score"], row["time"]) == (3, 12, 5, 0.7, 1.25)


def test_to_jsonable_handles_numpy_and_non_finite():
    assert to_jsonable({"a": np.float32(1.5), "b": np.arange(2), "c": float("nan"), "d": np.bool_(True)}) == \
        {"a": 1.5, "b": [0, 1], "c": None, "d": True}


def test_overlay_draws_the_box_where_it_projects():
    K = np.array([[100.0, 0, 63.5], [0, 100.0, 47.5], [0, 0, 1]])
    image = np.zeros((96, 128, 3), np.uint8)
    pose = np.eye(4)
    pose[:3, 3] = [0, 0, 1.0]
    bounds = np.array([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]])
    out = overlay(image, pose, K, bounds)
    assert out.shape == image.shape and image.sum() == 0  # input untouched
    drawn = out.any(axis=2)
    # front face corners project to 63.5 +- 100*0.1/0.9 = +-11 px: lines near there, nothing far away
    assert drawn[36:60, 52:76].any() and not drawn[:, :40].any() and not drawn[:, 90:].any()
    # a pose behind the camera draws nothing and does not crash
    behind = pose.copy()
    behind[2, 3] = -1.0
    assert not overlay(image, behind, K, bounds).any()
    assert box_corners(bounds).shape == (8, 3)


def test_crop_grid_tiles_batches():
    crops = np.random.default_rng(0).random((5, 3, 16, 16)).astype(np.float32)
    depth = np.random.default_rng(1).random((5, 1, 16, 16)).astype(np.float32)
    grid = crop_grid([crops, depth], labels=[f"{i}" for i in range(5)], columns=2, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 18 + 2, 2 * 34 + 2, 3)


def test_scene_raw_back_projects_depth(tmp_path):
    K = np.array([[10.0, 0, 1.0], [0, 10.0, 1.0], [0, 0, 1]])
    depth = np.array([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    points, colours = depth_to_points(depth, K)
    assert len(points) == 5 and colours.shape == (5, 3)
    np.testing.assert_allclose(points[1], [(2 - 1) * 2.0 / 10, (0 - 1) * 2.0 / 10, 2.0], rtol=1e-6)
    path = write_scene_raw(tmp_path / "scene_raw.ply", depth, K, rgb=np.zeros((2, 3, 3), np.uint8))
    np.testing.assert_allclose(np.asarray(trimesh.load(path).vertices), points, rtol=1e-6)


def test_model_tf_obj_is_the_posed_mesh(tmp_path):
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    pose = np.eye(4)
    pose[:3, 3] = [0, 0, 2]
    mesh = trimesh.Trimesh(verts, [[0, 1, 2]], process=False)
    text = write_mesh_at_pose(tmp_path / "m.obj", mesh, pose).read_text()
    vlines = [line.split() for line in text.splitlines() if line.startswith("v ")]
    np.testing.assert_allclose(np.array([v[1:4] for v in vlines], float), verts + [0, 0, 2])
    assert any(line.split()[:1] == ["f"] for line in text.splitlines())
