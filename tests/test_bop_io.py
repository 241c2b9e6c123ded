"""BOP files: COCO RLE, detections, test targets, BOP19 selection, results names, the
calc_gt_info fields write_bop writes, and BOPReader without scene_gt.json."""
import json
import warnings

import cv2
import numpy as np
import pytest
import trimesh

from chunkpose.io import bop, bop_results
from chunkpose.io.bop_gt import gt_info
from chunkpose.io.bop_reader import BOPReader
from chunkpose.io.bop_writer import BopGt, BopImage, write_bop, write_bop_dataset

# 3x4 mask; column-major it reads 0 0 1 | 1 1 0 | 0 1 0 | 0 0 0
MASK = np.array([[0, 1, 0, 0],
                 [0, 1, 1, 0],
                 [1, 0, 0, 0]], dtype=bool)
MASK_COUNTS = [2, 3, 2, 1, 4]


def test_uncompressed_rle_by_hand():
    rle = bop.encode_rle(MASK, compressed=False)
    assert rle == {"size": [3, 4], "counts": MASK_COUNTS}
    np.testing.assert_array_equal(bop.decode_rle(rle), MASK)
    starts_with_object = np.zeros((2, 2), bool)
    starts_with_object[0, 0] = True
    rle = bop.encode_rle(starts_with_object, compressed=False)
    assert rle["counts"] == [0, 1, 3]  # a leading empty background run, as COCO has
    np.testing.assert_array_equal(bop.decode_rle(rle), starts_with_object)
    with pytest.raises(ValueError, match="add up"):
        bop.decode_rle({"size": [3, 4], "counts": [2, 3]})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own, under numpy 2
def test_compressed_rle_round_trip_and_agrees_with_pycocotools():
    from pycocotools import mask as coco

    rng = np.random.default_rng(0)
    for mask in (MASK, rng.uniform(size=(37, 53)) < 0.3, np.zeros((5, 6), bool), np.ones((4, 4), bool)):
        rle = bop.encode_rle(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
        np.testing.assert_array_equal(bop.decode_rle(rle), mask)
        plain = bop.encode_rle(mask, compressed=False)
        # pycocotools reads our uncompressed runs as the same mask, and compresses them alike
        converted = coco.frPyObjects(plain, *mask.shape)
        assert converted["counts"].decode() == rle["counts"]
        np.testing.assert_array_equal(coco.decode(converted).astype(bool), mask)


def test_detections_json_round_trip(tmp_path):
    dets = [
        bop.detection_from_mask(1, 0, 5, 0.9, MASK, time=0.25),
        bop.detection_from_mask(1, 0, 2, 0.4, ~MASK, time=0.25, compressed=False),
        bop.Detection(2, 7, 5, 0.1, (1.0, 2.0, 3.0, 4.0), None, None),
    ]
    assert dets[0].bbox == (0, 0, 3, 3)  # COCO's pixel box: w = x_max - x_min + 1
    path = bop.write_detections(tmp_path / "dets.json", dets)
    raw = json.loads(path.read_text())
    assert raw[0]["image_id"] == 0 and raw[0]["category_id"] == 5 and raw[2]["time"] == -1.0
    read = bop.read_detections(path)
    assert sorted(read) == [(1, 0), (2, 7)]
    first, second = read[(1, 0)]
    np.testing.assert_array_equal(first.mask, MASK)
    np.testing.assert_array_equal(second.mask, ~MASK)
    assert read[(2, 7)][0].mask is None and read[(2, 7)][0].time is None
    gz = bop.write_detections(tmp_path / "dets.json.gz", read)
    assert [d.score for d in bop.read_detections(gz)[(1, 0)]] == [0.9, 0.4]
    (tmp_path / "bad.json").write_text(json.dumps([{"scene_id": 1, "image_id": 0, "score": 0.5}]))
    with pytest.raises(bop.BopFileError, match="category_id"):
        bop.read_detections(tmp_path / "bad.json")


def _det(im_id, obj_id, score, scene_id=1, time=0.5):
    return bop.Detection(scene_id, im_id, obj_id, score, (0, 0, 1, 1), None, time)


def test_bop19_selection_best_n_per_target():
    dets = [
        _det(0, 1, 0.9), _det(0, 1, 0.2),                  # one target: the low score goes
        _det(0, 2, 0.5), _det(0, 2, 0.7), _det(0, 2, 0.6),  # two targets: 0.7 and 0.6
        _det(0, 3, 0.99),                                   # object not a target of the image
        _det(1, 1, 0.8),                                    # image not in the targets
        _det(3, 1, 0.4, time=0.5), _det(3, 1, 0.4, time=0.5),  # equal scores keep file order
        _det(4, 1, 0.9, scene_id=2),                        # another scene
    ]
    targets = [bop.Target(1, 0, 1, 1), bop.Target(1, 0, 2, 2), bop.Target(1, 2, 1, 1), bop.Target(1, 3, 1, 1),
               bop.Target(2, 4, 1, 1)]
    chosen = bop.select_detections(dets, targets)
    by_image = {}
    for d in dets:
        by_image.setdefault(d.key, []).append(d)
    assert bop.select_detections(by_image, targets) == chosen  # what read_detections gives
    assert list(chosen) == [(1, 0), (1, 2), (1, 3), (2, 4)]
    assert [(d.obj_id, d.score) for d in chosen[(1, 0)]] == [(1, 0.9), (2, 0.7), (2, 0.6)]
    assert chosen[(1, 2)] == []  # a target without detections has none, and is not an error
    assert chosen[(1, 3)] == [dets[7]] and chosen[(1, 3)][0] is dets[7]
    assert list(bop.select_detections(dets, targets, scene_id=2)) == [(2, 4)]


def test_detection_time_is_per_image():
    assert bop.image_detection_time([_det(0, 1, 0.9, time=0.3), _det(0, 2, 0.1, time=0.3)]) == 0.3
    assert bop.image_detection_time([_det(0, 1, 0.9, time=None)]) is None
    with pytest.warns(UserWarning, match="different times"):
        assert bop.image_detection_time([_det(0, 1, 0.9, time=0.3), _det(0, 2, 0.1, time=0.5)]) == 0.5


def test_targets_round_trip_and_errors(tmp_path):
    targets = [bop.Target(48, 1, 2, 1), bop.Target(48, 1, 5, 3)]
    path = bop.write_targets(tmp_path / "test_targets_bop19.json", targets)
    assert json.loads(path.read_text())[1] == {"im_id": 1, "inst_count": 3, "obj_id": 5, "scene_id": 48}
    assert bop.read_targets(path) == targets
    assert bop.targets_by_image(targets) == {(48, 1): {2: 1, 5: 3}}
    assert bop.default_targets_path(tmp_path) == path
    (tmp_path / "bop24.json").write_text(json.dumps([{"scene_id": 1, "im_id": 2}]))
    with pytest.raises(bop.BopFileError, match="inst_count"):
        bop.read_targets(tmp_path / "bop24.json")


@pytest.mark.parametrize("folder, name", [
    ("ycbv", "ycbv"), ("YCB-V", "ycbv"), ("ycbv_test_bop19", "ycbv"), ("/data/bop/LM-O", "lmo"),
    ("T-LESS", "tless"), ("tudl", "tudl"), ("icbin", "icbin"), ("itodd", "itodd"), ("hb_primesense", "hb"),
    ("hope", "hope"), ("hopev2", "hopev2"), ("hot3d", "hot3d"), ("handal", "handal"), ("ipd", "ipd"),
    ("xyzibd", "xyzibd"),
])
def test_dataset_names_as_bop_spells_them(folder, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bop_results.bop_dataset_name(folder) == name


def test_results_file_names():
    assert bop_results.results_filename("chunkpose", "ycbv") == "chunkpose_ycbv-test.csv"
    assert bop_results.results_filename("chunk-pose", "T-LESS", "test", "primesense") == "chunk-pose_tless-test-primesense.csv"
    with pytest.raises(ValueError, match="method.*'_'.*use '-'"):
        bop_results.results_filename("chunk_pose", "ycbv")
    with pytest.raises(ValueError, match="split"):
        bop_results.results_filename("chunkpose", "ycbv", "test_all")
    with pytest.warns(UserWarning, match="not one of BOP's"):
        assert bop_results.results_filename("chunkpose", "my_synth-set") == "chunkpose_mysynthset-test.csv"
    parsed = bop_results.parse_results_filename("/out/chunk-pose_tless-test-primesense.csv")
    assert (parsed["method"], parsed["dataset"], parsed["split"], parsed["split_type"]) == \
        ("chunk-pose", "tless", "test", "primesense")
    with pytest.raises(ValueError, match="METHOD_DATASET-SPLIT"):
        bop_results.parse_results_filename("synthbop.csv")


def test_results_rows_and_checker(tmp_path):
    good = tmp_path / "chunkpose_ycbv-test.csv"
    eye = " ".join(["1", "0", "0", "0", "1", "0", "0", "0", "1"])
    good.write_text(f"{bop_results.RESULTS_HEADER}\n48,1,2,0.9,{eye},1 2 3,0.5\n48,1,5,0.8,{eye},4 5 6,0.5\n")
    rows = bop_results.read_bop_results(good)
    assert len(rows) == 2 and rows[1]["obj_id"] == 5 and rows[1]["t"].tolist() == [4, 5, 6]
    assert bop_results.check_bop_results(good) == []
    bad = tmp_path / "chunkpose_ycbv-test_x.csv"
    bad.write_text(f"48,1,2,0.9,{eye},1 2 3,0.5\n48,1,5,0.8,{eye},4 5 6,0.7\n")  # header optional
    assert any("different times" in p for p in bop_results.check_bop_results(bad))
    short = tmp_path / "x_ycbv-test.csv"
    short.write_text("48,1,2,0.9\n")
    assert any("4 fields" in p for p in bop_results.check_bop_results(short))
    # what a CSV reader reads but bop_toolkit's split(",") refuses: a blank line, a quoted comma
    blank = tmp_path / "blank_ycbv-test.csv"
    blank.write_text(good.read_text() + "\n48,1,6,0.7," + eye + ",1 2 3,0.5\n")
    assert len(bop_results.read_bop_results(blank)) == 3
    assert bop_results.check_bop_results(blank) == [
        "line 4 is blank: bop_toolkit's reader needs 7 comma-separated values on every line"]
    quoted = tmp_path / "quoted_ycbv-test.csv"
    quoted.write_text(f'48,1,2,"0.9",{eye},1 2 3,0.5\n')
    assert len(bop_results.read_bop_results(quoted)) == 1
    assert any("quotes" in p for p in bop_results.check_bop_results(quoted))


def test_gt_info_by_hand():
    """calc_gt_info's fields for a 4x5 px square, 2 px of it left of the image, 4 px
    behind an occluder, one px without depth (visible, not valid), one 10 mm behind the
    measured depth (within delta: visible)."""
    H, W = 6, 8
    K = np.array([[1e6, 0, 0], [0, 1e6, 0], [0, 0, 1]], float)  # distance == depth here
    canvas = np.zeros((6, 10))
    canvas[1:5, 0:5] = 1000.0  # canvas column c is image column c - 2
    scene = np.full((H, W), 2000.0)
    scene[1:5, 0:2] = 1000.0
    scene[1:5, 2] = 900.0  # an occluder 100 mm in front
    scene[1, 0] = 0.0  # missing depth
    scene[2, 1] = 1010.0
    info, visib, silhouette = gt_info(scene, K, canvas, offset=(-2, 0))
    assert info == {"px_count_all": 20, "px_count_valid": 11, "px_count_visib": 8, "visib_fract": 0.4,
                    "bbox_obj": [-2, 1, 4, 3], "bbox_visib": [0, 1, 1, 3]}
    assert silhouette.sum() == 12 and visib[1:5, 0:2].all() and visib.sum() == 8
    hidden, _, _ = gt_info(np.full((H, W), 500.0), K, canvas, offset=(-2, 0))
    assert hidden["px_count_visib"] == 0 and hidden["bbox_obj"] == [-1, -1, -1, -1]


def _quad(side, z=0.0):
    h = side / 2
    vertices = np.array([[-h, -h, z], [h, -h, z], [h, h, z], [-h, h, z]])
    faces = [[0, 1, 2], [0, 2, 3], [0, 2, 1], [0, 3, 2]]  # both windings
    return trimesh.Trimesh(vertices, faces, process=False)


@pytest.mark.gl
def test_write_bop_fields_match_calc_gt_info(tmp_path):
    """A 0.15 m square at 1 m seen by fx = 100: 15x15 px, its 5 left columns outside the
    image; 2 columns behind an occluder; 3 px without depth. A second object entirely
    hidden (visib 0) is no target."""
    H, W = 48, 64
    K = np.array([[100.0, 0, 31.5], [0, 100.0, 23.5], [0, 0, 1]])
    pose = np.eye(4)
    # centre at pixel (2, 24) on bop_toolkit's grid (pixel i centred at u = i + 0.5): columns -5..9
    pose[:3, 3] = [(2.5 - 31.5) / 100, (24.5 - 23.5) / 100, 1.0]
    hidden_pose = np.eye(4)
    hidden_pose[:3, 3] = [0.1, 0.0, 1.5]  # pixels ~ 34..44 x 19..28
    depth = np.full((H, W), 2.0)
    depth[17:32, 0:10] = 1.0
    depth[17:32, 0:2] = 0.9  # occluder
    depth[20, 5] = depth[21, 5] = depth[22, 6] = 0.0
    depth[15:35, 30:50] = 1.0  # hides the second object
    image = BopImage(np.zeros((H, W, 3), np.uint8), depth, K, [BopGt(1, pose), BopGt(2, hidden_pose)])
    meshes = {1: _quad(0.15), 2: _quad(0.1)}
    root = write_bop_dataset(tmp_path / "bop", [image], meshes, scene_id=3)
    info = json.loads((root / "test" / "000003" / "scene_gt_info.json").read_text())["0"]
    assert info[0] == {"px_count_all": 225, "px_count_valid": 147, "px_count_visib": 120,
                       "visib_fract": 120 / 225, "bbox_obj": [-5, 17, 14, 14], "bbox_visib": [2, 17, 7, 14]}
    assert info[1]["visib_fract"] == 0.0 and info[1]["px_count_all"] > 0
    visib = cv2.imread(str(root / "test" / "000003" / "mask_visib" / "000000_000000.png"), cv2.IMREAD_UNCHANGED) > 0
    expected = np.zeros((H, W), bool)
    expected[17:32, 2:10] = True
    np.testing.assert_array_equal(visib, expected)
    full = cv2.imread(str(root / "test" / "000003" / "mask" / "000000_000000.png"), cv2.IMREAD_UNCHANGED) > 0
    assert full.sum() == 150
    assert json.loads((root / "test_targets_bop19.json").read_text()) == [
        {"im_id": 0, "inst_count": 1, "obj_id": 1, "scene_id": 3}]
    for folder in ("models", "models_eval"):
        assert sorted(p.name for p in (root / folder).iterdir()) == ["models_info.json", "obj_000001.ply",
                                                                     "obj_000002.ply"]
    assert (root / "models" / "obj_000001.ply").read_bytes() == (root / "models_eval" / "obj_000001.ply").read_bytes()
    (det,) = bop.detections_from_mask_visib(root, scene_id=3)
    np.testing.assert_array_equal(det.mask, expected)  # the hidden object's empty mask gives none
    assert (det.scene_id, det.im_id, det.score) == (3, 0, 1.0)
    withheld = write_bop_dataset(tmp_path / "test_set", [image], meshes, scene_id=3, ground_truth=False)
    scene = withheld / "test" / "000003"
    assert sorted(p.name for p in scene.iterdir()) == ["depth", "rgb", "scene_camera.json"]
    assert (withheld / "test_targets_bop19.json").read_text() == (root / "test_targets_bop19.json").read_text()


@pytest.mark.gl
def test_reader_without_ground_truth_takes_instances_from_detections(tmp_path):
    from chunkpose.synth import make_scene

    scene = make_scene(mesh="mug", width=160, height=120, frames=2, footprint=0.08, seed=3, distractors=1)
    root = write_bop(tmp_path / "bop", scene.rgb, scene.depth, scene.K, scene.masks, scene.poses, scene.mesh,
                     ground_truth=False)
    assert not (root / "test" / "000001" / "scene_gt.json").exists()
    reader = BOPReader(root, scene_id=1)
    assert len(reader) == 2 and not reader.has_ground_truth() and reader.index_of(1) == 1
    frame, instances = reader.frame(1)
    assert instances == [] and frame.mask is None and frame.extra["im_id"] == 1 and frame.extra["scene_id"] == 1
    image = reader.image(1)
    np.testing.assert_array_equal(image.rgb, scene.rgb[1])
    dets = [bop.detection_from_mask(1, 1, 1, 0.9, scene.masks[1]), bop.Detection(1, 1, 1, 0.5, (10, 20, 30, 40.5))]
    with pytest.warns(UserWarning, match="boxes serve as masks"):
        inst, boxed = reader.detection_instances(image, dets)  # BOP's box-only detections of seen objects
    assert (inst.obj_id, inst.gt_index, inst.score, inst.gt_pose) == (1, 0, 0.9, None)
    np.testing.assert_array_equal(inst.mask, scene.masks[1])
    expected = np.zeros((120, 160), bool)
    expected[20:61, 10:40] = True  # rows 20 .. 60.5 cover pixel 60
    assert (boxed.gt_index, boxed.score) == (1, 0.5)
    np.testing.assert_array_equal(boxed.mask, expected)
    half = BOPReader(root, scene_id=1, downscale=0.5)
    (small,) = half.detection_instances(half.image(1), dets[:1])
    assert small.mask.shape == (60, 80) and small.mask.any()
    with pytest.warns(UserWarning):
        (small_box,) = half.detection_instances(half.image(1), dets[1:])
    assert small_box.mask.sum() == 15 * 21  # columns 5 .. 20, rows 10 .. 30.25
    with pytest.raises(ValueError, match="image 0 was given for image 1"):
        reader.detection_instances(image, [bop.detection_from_mask(1, 0, 1, 0.9, scene.masks[0])])


def test_tless_layout_split_types_and_cad_models(tmp_path):
    """T-LESS publishes test_primesense/ and models_cad/ (no test/, no models/): a bare
    --split test finds the typed folder, the results name keeps split and type apart."""
    from test_readers import write_bop as write_small_bop

    root = tmp_path / "tless"
    write_small_bop(root)
    (root / "test").rename(root / "test_primesense")
    (root / "models").rename(root / "models_cad")
    assert bop_results.split_folder(root, "test") == bop_results.SplitFolder("test_primesense", "test", "primesense")
    assert bop_results.split_folder(root, "test_primesense") == bop_results.split_folder(root, "test")
    assert bop_results.split_folder(root, "val") == bop_results.SplitFolder("val", "val")
    assert bop_results.results_filename("m", "tless", "test", "primesense") == "m_tless-test-primesense.csv"
    reader = BOPReader(root, split="test_primesense", scene_id=2)
    assert reader.models_dir == root / "models_cad"
    assert reader.model_info(1)["diameter"] == pytest.approx(0.08)
    (root / "test_pbr").mkdir()  # two typed folders: nothing is guessed
    assert bop_results.split_folder(root, "test") == bop_results.SplitFolder("test", "test")


def test_repeated_targets_keep_the_last_count_as_bop_toolkit():
    targets = [bop.Target(1, 2, 3, 1), bop.Target(1, 2, 4, 1), bop.Target(1, 2, 3, 2)]
    assert bop.targets_by_image(targets) == {(1, 2): {3: 2, 4: 1}}
