"""Downstream data formats and metrics: COCO (detection) and the ADE20K layout (segmentation) read from
tiny generated datasets, every malformed case a user can hit, COCO AP and mIoU against hand-computed
values, the GPR1200 layout, the recipes and their schedules, and the Semantic FPN that
`lowformer bench --task segmentation` times. No training here (tests/test_downstream_train.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lowformer.downstream import synthetic
from lowformer.downstream._data import DatasetError, Failed, StepSampler
from lowformer.downstream.ade20k import SegmentationDataset, ade_split, class_names, collate_segmentation
from lowformer.downstream.coco import CocoDetectionDataset, check_coco, coco_api, coco_split, evaluate_coco
from lowformer.downstream.recipe import RecipeError, list_recipes, load_recipe
from lowformer.downstream.retrieval import evaluate_retrieval, list_flat_images, retrieval_metrics
from lowformer.downstream.seg_metrics import confusion_matrix, segmentation_metrics

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady on a shared machine: two threads wait on each other under load
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return synthetic.write_coco_shapes(tmp_path_factory.mktemp("coco"), num_train=6, num_val=3, image_size=64)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return synthetic.write_ade_shapes(tmp_path_factory.mktemp("ade"), num_train=4, num_val=2, image_size=48)


def _copy(root, tmp_path):
    return shutil.copytree(root, tmp_path / "copy")


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


def test_coco_shapes_load_as_torchvision_targets(coco_root):
    split = coco_split(coco_root, "train2017")
    info = check_coco(split, need_masks=True)
    assert info.names == ["rectangle", "ellipse", "triangle"] and info.num_classes == 4
    ds = CocoDetectionDataset(split, info, train=True, masks=True, hflip=0.0)
    assert len(ds) == 6
    image, target = ds[(0, 123)]
    raw = info.data["annotations"]
    first = [a for a in raw if a["image_id"] == ds.image_id(0)]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["labels"].tolist() == [a["category_id"] for a in first]  # ids 1..3 are already contiguous
    x, y, w, h = first[0]["bbox"]
    assert target["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-4)
    assert target["masks"].shape == (len(first), 64, 64) and target["masks"].dtype == torch.uint8
    # the mask lies inside its box and fills most of it
    m = target["masks"][0].bool()
    ys, xs = m.nonzero(as_tuple=True)
    assert xs.min() >= x - 1 and xs.max() <= x + w + 1 and m.sum() > 0.4 * w * h
    # the seed fixes the augmentation: a flip either way, the same for the same seed
    flip = CocoDetectionDataset(split, info, train=True, hflip=0.5)
    a, b = flip[(0, 5)], flip[(0, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    flipped = [flip[(0, s)][1]["boxes"][0, 0].item() for s in range(8)]
    assert len({round(v, 3) for v in flipped}) == 2  # x0 and 64 - x1


def test_coco_category_ids_with_gaps_crowd_and_empty_images(coco_root, tmp_path):
    root = _copy(coco_root, tmp_path)
    ann = root / "annotations" / "instances_train2017.json"

    def edit(data):
        remap = {1: 7, 2: 3, 3: 90}  # COCO's ids have gaps
        for c in data["categories"]:
            c["id"] = remap[c["id"]]
        for a in data["annotations"]:
            a["category_id"] = remap[a["category_id"]]
        data["annotations"][0]["iscrowd"] = 1
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]  # image 2: no objects

    _edit_json(ann, edit)
    split = coco_split(root, "train2017")
    info = check_coco(split)
    assert info.category_ids == [3, 7, 90] and info.dropped["crowd"] == 1
    train = CocoDetectionDataset(split, info, train=True, hflip=0.0)
    assert 2 not in [train.image_id(i) for i in range(len(train))]  # no usable box: not trained on
    data = json.loads(ann.read_text())
    for i in range(len(train)):
        _, target = train[i]
        kept = [a for a in data["annotations"] if a["image_id"] == train.image_id(i) and not a.get("iscrowd")]
        assert target["labels"].tolist() == [{3: 1, 7: 2, 90: 3}[a["category_id"]] for a in kept]
    evaluation = CocoDetectionDataset(split, info, train=False)
    assert len(evaluation) == 6  # every image is evaluated
    assert evaluation[[evaluation.image_id(i) for i in range(6)].index(2)][1]["boxes"].shape == (0, 4)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["images"][0].update(file_name="gone.jpg"), "missing image files (1 of 6)"),
        (lambda d: d["annotations"][0].update(bbox=[50, 50, 30, 30]), "boxes outside their image"),
        (lambda d: d["annotations"][0].update(category_id=42), "unknown category ids: annotation 1: category_id 42"),
        (lambda d: d["annotations"][0].update(image_id=999), "annotations of unknown image ids"),
        (lambda d: d["images"][1].update(id=d["images"][0]["id"]), "duplicate image ids"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "malformed boxes"),
        (lambda d: d["annotations"][0].pop("segmentation"), "without a segmentation (Mask R-CNN needs masks)"),
        (lambda d: d.pop("annotations"), "'annotations' missing or not a list"),
        (lambda d: d["categories"].clear(), "no categories"),
    ],
)
def test_malformed_coco_files_are_refused_with_what_to_fix(coco_root, tmp_path, edit, message):
    root = _copy(coco_root, tmp_path)
    _edit_json(root / "annotations" / "instances_train2017.json", edit)
    with pytest.raises(DatasetError, match="instances_train2017.json has problems|missing or not a list") as e:
        check_coco(coco_split(root, "train2017"), need_masks=True)
    assert message in str(e.value)


def test_coco_layout_and_file_errors(coco_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        coco_split(tmp_path / "nowhere", "train2017")
    with pytest.raises(DatasetError, match=r"instances_train\.json.*missing.*annotation files found: "
                                           r"instances_train2017\.json, instances_val2017\.json"):  # fmt: skip
        coco_split(coco_root, "train")
    root = _copy(coco_root, tmp_path)
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        check_coco(coco_split(root, "val2017"))
    # an image whose size differs from the file's width/height: reported by the sample, with the file
    Image.new("RGB", (40, 30)).save(root / "train2017" / "000000.jpg")
    split = coco_split(root, "train2017")
    sample = CocoDetectionDataset(split, check_coco(split), train=False)[0]
    assert isinstance(sample, Failed) and "000000.jpg is 40x30 but the annotation file says 64x64" in sample.message


def _coco_gt(boxes_per_image: list[list[list[float]]]):
    """A pycocotools ground truth of one category from [x, y, w, h] boxes per image."""
    from lowformer.downstream.coco import CocoInfo

    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in range(len(boxes_per_image))]
    anns = [
        {"id": len(images) * 100 + k, "image_id": i + 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, boxes in enumerate(boxes_per_image)
        for k, b in enumerate(boxes)
    ]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    return coco_api(CocoInfo(data, data["categories"], len(images), len(anns)))


def _det(image_id, box, score):
    return {"image_id": image_id, "category_id": 1, "bbox": box, "score": score}


def test_coco_ap_against_hand_computed_values():
    gt = _coco_gt([[[10, 10, 100, 100], [120, 120, 50, 50]]])
    # both found, best score first: AP 1 at every IoU threshold
    m = evaluate_coco(gt, [_det(1, [10, 10, 100, 100], 0.9), _det(1, [120, 120, 50, 50], 0.8)])["bbox"]
    assert (m.AP, m.AP50, m.AP75) == pytest.approx((1.0, 1.0, 1.0), abs=1e-9)
    assert m.APs is None and m.APm == pytest.approx(1.0) and m.APl == pytest.approx(1.0)  # no small objects: None

    # hit, false positive, hit: precision 1 up to recall 0.5, then 2/3 up to recall 1. COCO's 101-point
    # interpolation: 51 recall points (0..0.50) at precision 1, 50 (0.51..1.00) at 2/3
    dets = [_det(1, [10, 10, 100, 100], 0.9), _det(1, [150, 10, 40, 40], 0.8), _det(1, [120, 120, 50, 50], 0.7)]
    m = evaluate_coco(gt, dets)["bbox"]
    assert m.AP50 == pytest.approx((51 * 1 + 50 * 2 / 3) / 101, abs=1e-9)
    assert m.AP == pytest.approx(m.AP50, abs=1e-9)  # both true positives are exact: the same at every IoU

    # one object, one detection shifted so that IoU = 80 * 100 / (100 * 100 + 20 * 100) = 2/3: a true
    # positive for IoU thresholds 0.50, 0.55, 0.60, 0.65 (4 of the 10), a miss above
    gt = _coco_gt([[[0, 0, 100, 100]]])
    m = evaluate_coco(gt, [_det(1, [20, 0, 100, 100], 0.5)])["bbox"]
    assert (m.AP50, m.AP75, m.AP) == pytest.approx((1.0, 0.0, 0.4), abs=1e-9)

    # nothing detected: 0, not an error
    assert evaluate_coco(gt, [])["bbox"].AP == 0.0


# --------------------------------------------------------------------------------------------
# ADE20K layout
# --------------------------------------------------------------------------------------------


def _recipe(**changes):
    base = dict(num_classes=4, scale=[48, 48], ratio_range=[0.8, 1.25], crop_size=[32, 32], eval_crop=[32, 32],
                eval_stride=[16, 16])  # fmt: skip
    return load_recipe("segmentation", "demo").replace(**{**base, **changes})


def test_ade_layout_loads_with_reduce_zero_label(ade_root):
    split = ade_split(ade_root, "training")
    assert len(split.pairs) == 4 and all(i.stem == lab.stem for i, lab in split.pairs)
    assert class_names(ade_root, 4) == ["background", "rectangle", "ellipse", "triangle"]
    stored = np.asarray(Image.open(split.pairs[0][1]))
    assert set(np.unique(stored)) <= {0, 1, 2, 3, 4} and 0 in stored  # 0: the unlabelled outlines
    recipe = _recipe()
    ds = SegmentationDataset(split, recipe, MEAN, STD, train=False)
    image, label = ds[0]
    assert image.shape == (3, 48, 48) and label.shape == (48, 48)
    want = np.where(stored == 0, 255, stored.astype(np.int64) - 1)  # ADE: 0 ignored, 1..K -> 0..K-1
    assert np.array_equal(label.numpy(), want)
    train = SegmentationDataset(split, recipe, MEAN, STD, train=True)
    image, label = train[(0, 11)]
    assert image.shape == (3, 32, 32) and label.shape == (32, 32)
    again = train[(0, 11)]
    assert torch.equal(image, again[0]) and torch.equal(label, again[1])  # the seed fixes the augmentation
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}
    images, labels, failed = collate_segmentation([train[(i, i)] for i in range(4)])
    assert len(images) == 4 and not failed


def test_ade_label_values_without_reduce_zero_label(ade_root, tmp_path):
    root = _copy(ade_root, tmp_path)
    path = ade_split(root, "validation").pairs[0][1]
    Image.fromarray(np.array([[0, 1], [3, 255]], dtype=np.uint8)).resize((48, 48), 0).save(path)
    r = _recipe(reduce_zero_label=False)
    _, label = SegmentationDataset(ade_split(root, "validation"), r, MEAN, STD, train=False)[0]
    assert set(label.unique().tolist()) == {0, 1, 3, 255}  # stored values are the classes; 255 ignored


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda img, lab: Image.fromarray(np.full((48, 48), 9, np.uint8)).save(lab),
         "has values [9] outside the class range: with num_classes 4 the valid values are 0 (ignored) and 1..4"),
        (lambda img, lab: Image.new("RGB", (48, 48)).save(lab), "is a RGB image; label maps are single-channel"),
        (lambda img, lab: Image.new("L", (40, 48), 1).save(lab), "is 40x48 but its image"),
        (lambda img, lab: lab.write_bytes(b"not a png"), "cannot read"),
    ],
)  # fmt: skip
def test_bad_label_maps_are_reported_with_the_file(ade_root, tmp_path, damage, message):
    root = _copy(ade_root, tmp_path)
    image_path, label_path = ade_split(root, "validation").pairs[1]
    damage(image_path, label_path)
    ds = SegmentationDataset(ade_split(root, "validation"), _recipe(), MEAN, STD, train=False)
    assert not isinstance(ds[0], Failed)
    sample = ds[1]
    assert isinstance(sample, Failed) and message in sample.message and label_path.name in sample.message
    with pytest.raises(DatasetError, match="outside the class range|single-channel|but its image|cannot read"):
        from lowformer.downstream._data import raise_failures

        raise_failures(collate_segmentation([ds[0], ds[1]])[2])


def test_ade_layout_errors(ade_root, tmp_path):
    with pytest.raises(DatasetError, match=r"images/train and .*annotations/train missing\. Expected the ADE20K"):
        ade_split(ade_root, "train")
    root = _copy(ade_root, tmp_path)
    next((root / "annotations" / "training").iterdir()).unlink()
    (root / "annotations" / "training" / "extra.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="1 images without a label map .*; 1 label maps without an image"):
        ade_split(root, "training")
    with pytest.raises(DatasetError, match="names 4 classes but the recipe has num_classes 150"):
        class_names(root, 150)
    assert class_names(tmp_path, 3) == ["0", "1", "2"]  # no classes.txt: numbers


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def test_miou_and_pixel_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    c = confusion_matrix(pred, target, num_classes=4)
    assert c.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]  # the 255 pixel is ignored
    m = segmentation_metrics(c, ["a", "b", "c", "d"])
    # IoU: a 2 / (3 + 3 - 2), b 2 / (2 + 3 - 2), c 1 / (2 + 1 - 1); d absent from labels and predictions
    assert m.iou == pytest.approx([0.5, 2 / 3, 0.5, None])
    assert m.miou == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert m.accuracy == pytest.approx([2 / 3, 1.0, 0.5, None])
    assert m.pixel_accuracy == pytest.approx(5 / 7) and m.pixels == 7
    assert m.mean_accuracy == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert "n/a" in m.table() and "mIoU 0.5556" in m.summary()
    # a class predicted but never labelled has IoU 0 (it pulls the mean down), accuracy undefined
    m = segmentation_metrics(confusion_matrix(torch.tensor([3]), torch.tensor([0]), 4))
    assert m.iou == [0.0, None, None, 0.0] and m.miou == 0.0 and m.accuracy[3] is None
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 4)


# --------------------------------------------------------------------------------------------
# retrieval: GPR1200's flat layout, through a DataLoader with workers
# --------------------------------------------------------------------------------------------


def test_gpr1200_flat_layout(tmp_path):
    from lowformer.downstream import embedding_lowformer

    root = synthetic.write_retrieval_folders(tmp_path / "set", num_classes=3, query_per_class=0, gallery_per_class=3)
    flat = tmp_path / "gpr"
    flat.mkdir()
    for cls in range(3):
        for n, path in enumerate(sorted((root / "gallery" / f"class_{cls}").iterdir())):
            shutil.copy(path, flat / f"{10 - cls * 4}_{n}.png")  # classes 10, 6, 2: sorted as numbers
    items = list_flat_images(flat)
    assert [c for _, c in items] == ["2"] * 3 + ["6"] * 3 + ["10"] * 3
    model = embedding_lowformer("lowformer_b0", embed_dim=None)
    result = evaluate_retrieval(model, flat, image_size=32, workers=1, batch_size=4)
    assert result.protocol == "all-vs-all (self included)" and result.num_queries == 9  # GPR1200's protocol
    loo = evaluate_retrieval(model, flat, image_size=32, include_self=False)
    assert loo.protocol == "leave-one-out"
    (flat / "stray.png").write_bytes((flat / "2_0.png").read_bytes())
    with pytest.raises(ValueError, match="1 file names have no class prefix"):
        evaluate_retrieval(model, flat, image_size=32)
    # the reference: the same embeddings scored directly
    ref = retrieval_metrics(torch.eye(3).repeat_interleave(3, 0), [0, 0, 0, 1, 1, 1, 2, 2, 2], include_self=True)
    assert ref.mean_average_precision == 1.0


# --------------------------------------------------------------------------------------------
# recipes and schedules
# --------------------------------------------------------------------------------------------


def test_presets_load_and_schedules_follow_mmcv():
    assert list_recipes("detection") == ["demo", "fasterrcnn_1x", "maskrcnn_1x", "retinanet_1x"]
    assert list_recipes("segmentation") == ["demo", "semantic_fpn_40k"]
    r = load_recipe("detection", "retinanet_1x")
    assert (r.lr, r.lr_batch, r.weight_decay, r.epochs, r.lr_steps, r.min_size, r.max_size) == (
        1e-4, 16, 1e-4, 12, [8, 11], 800, 1333)  # fmt: skip
    assert r.scaled(8) == (16, pytest.approx(1e-4)) and r.scaled(1) == (2, pytest.approx(1.25e-5))
    s = r.schedule(steps_per_epoch=100, lr=1e-4)
    assert s.total_steps == 1200 and s.eval_every == 100
    assert s.lr_at(0) == pytest.approx(1e-7)  # warm-up from lr x 0.001
    assert s.lr_at(250) == pytest.approx(1e-4 * (1 - 0.999 * 0.5))  # mmcv's linear warm-up, half way
    assert [s.lr_at(t) for t in (799, 800, 1099, 1100)] == pytest.approx([1e-4, 1e-5, 1e-5, 1e-6])
    seg = load_recipe("segmentation", "semantic_fpn_40k")
    assert (seg.lr, seg.lr_batch, seg.iterations, seg.crop_size, seg.num_classes) == (2e-4, 32, 40000, [512, 512], 150)
    p = seg.schedule(steps_per_epoch=10, lr=2e-4)
    assert p.lr_at(0) == pytest.approx(2e-4) and p.lr_at(20000) == pytest.approx(2e-4 * 0.5**0.9)
    assert load_recipe("detection", "maskrcnn_1x").detector == "maskrcnn"


def test_recipe_errors():
    with pytest.raises(RecipeError, match="unknown recipe key 'lr_stesp' \\(did you mean 'lr_steps'\\?\\)"):
        load_recipe("detection", "demo").replace(lr_stesp=[1])
    with pytest.raises(RecipeError, match="recipe 'semantic_fpn_4k'. Did you mean semantic_fpn_40k"):
        load_recipe("segmentation", "semantic_fpn_4k")
    with pytest.raises(RecipeError, match="detector is one of retinanet, fasterrcnn, maskrcnn"):
        load_recipe("detection", "demo").replace(detector="yolo")
    with pytest.raises(RecipeError, match="lr_steps are epochs in"):
        load_recipe("detection", "demo").replace(epochs=1)
    with pytest.raises(RecipeError, match="ignore_index must be in"):
        load_recipe("segmentation", "demo").replace(ignore_index=2)
    with pytest.raises(RecipeError, match="eval_mode=.tile. is not str|eval_mode is whole or slide"):
        load_recipe("segmentation", "demo").replace(eval_mode="tile")


def test_step_sampler_is_a_function_of_seed_epoch_and_step():
    full = list(StepSampler(10, 2, seed=0, epoch=1))
    assert len(full) == 5 and sorted(i for batch in full for i, _ in batch) == list(range(10))
    assert list(StepSampler(10, 2, seed=0, epoch=1, start_step=3)) == full[3:]  # a resumed epoch
    ranks = [list(StepSampler(10, 2, seed=0, epoch=1, world_size=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == 2  # 10 // (2 x 2); the last incomplete batch is dropped
    assert [a + b for a, b in zip(*ranks)] == [x + y for x, y in zip(full[::2], full[1::2])][:2]
    assert full != list(StepSampler(10, 2, seed=0, epoch=2))


# --------------------------------------------------------------------------------------------
# the model `lowformer bench --task segmentation` times
# --------------------------------------------------------------------------------------------


def test_segmentation_timing_model_traces_and_exports(tmp_path):
    from lowformer.downstream.segmentation import SEGMENTATION_BENCH_CLASSES, semantic_fpn_timing_model

    model = semantic_fpn_timing_model("lowformer_b0")
    assert not model.training and SEGMENTATION_BENCH_CLASSES == 150
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (1, 150, 64, 64)
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), ref, atol=1e-5)
    pytest.importorskip("onnxruntime")
    from lowformer.export import export, verify

    # the path `lowformer bench --backend onnxruntime` takes: the dynamo exporter, run on ONNX Runtime
    path = export(model, tmp_path / "seg.onnx", "onnx", example_input=x)
    report = verify(model, path, "onnx", (64, 64))
    assert report.passed, report.summary()
