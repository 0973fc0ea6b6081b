"""Downstream: backbones with FPN in torchvision's detectors, Semantic FPN, retrieval embeddings and metrics.

Every model is trained for a few dozen steps on synthetic data made here (rectangles coloured by
class) at 64-128 px with one thread and a narrow FPN, so the file stays fast on a shared 2-core CPU.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from helpers import randomize_bn
from sklearn.metrics import average_precision_score
from torch import nn

import lowformer
from lowformer.deploy import deploy
from lowformer.downstream import (
    AvgPool,
    GeM,
    create_backbone,
    embedding_lowformer,
    evaluate_retrieval,
    fasterrcnn_lowformer,
    retinanet_lowformer,
    retrieval_metrics,
    semantic_fpn_lowformer,
    synthetic,
    train_detection,
    train_retrieval,
    train_segmentation,
)

SMALL = dict(fpn_channels=64)  # narrow FPN and heads: the RetinaNet head dominates the cost at 256


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady on a shared machine: two threads wait on each other under load
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _falls(losses: list[float], factor: float) -> bool:
    """The mean of the last five steps is below `factor` times the mean of the first five."""
    return statistics.mean(losses[-5:]) < factor * statistics.mean(losses[:5])


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, strides, want",
    [
        ("lowformer_b0", (4, 8, 16, 32), [32, 64, 128, 256]),
        ("edgevit_xxs", (8, 16, 32), [72, 144, 288]),
        ("timm:test_resnet", (8, 16, 32), [48, 192, 96]),  # picked by stride: its stride-2 stem level is skipped
    ],
)
def test_backbone_levels_are_chosen_by_stride(name, strides, want):
    backbone = create_backbone(name, strides=strides).eval()
    assert backbone.strides == list(strides) and backbone.channels == want
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // s, 96 // s) for c, s in zip(want, strides)]
    assert backbone.size_divisor == (32 if name.startswith("edgevit") else 1)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="Did you mean lowformer_b1"):
        retinanet_lowformer("lowformr_b1", num_classes=3)
    with pytest.raises(ValueError, match="write timm:resnet18"):
        create_backbone("resnet18")
    with pytest.raises(ValueError, match="timm:fastvit_t8"):
        create_backbone("timm:fastvit_t9")
    with pytest.raises(ValueError, match="does not support feature extraction"):
        create_backbone(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="no feature level at stride 4"):
        create_backbone("timm:test_vit")  # a plain ViT has stride 16 only
    with pytest.raises(ValueError, match="out of range"):
        create_backbone("lowformer_b0", out_indices=(2, 7))
    with pytest.raises(ValueError, match="trainable_stages must be between 0"):
        create_backbone("lowformer_b0", trainable_stages=6)
    for bad in (0, -1, 2.0, "3", True):
        with pytest.raises(ValueError, match="num_classes must be an integer"):
            retinanet_lowformer("lowformer_b0", num_classes=bad)
    with pytest.raises(ValueError, match="background class 0"):
        fasterrcnn_lowformer("lowformer_b0", num_classes=1)
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        semantic_fpn_lowformer("lowformer_b0", num_classes=0)
    with pytest.raises(TypeError, match="unknown RetinaNet option.* min_sise"):
        retinanet_lowformer("lowformer_b0", num_classes=3, min_sise=512)  # torchvision alone ignores it


def test_frozen_bn_and_frozen_stages(tmp_path):
    backbone = create_backbone("lowformer_b0", frozen_bn=True, trainable_stages=2).train()
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("body.model.stages.2.", "body.model.stages.3.")) for n in trainable)
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())  # BatchNorm affines are frozen too
    assert not backbone.body.model.stem.training and backbone.body.model.stages[3].training
    before = [m.running_mean.clone() for m in bns]
    backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))  # statistics do not move
    assert not any(p.requires_grad for p in create_backbone("lowformer_b0", trainable_stages=0).parameters())
    assert all(p.requires_grad for p in create_backbone("lowformer_b0", trainable_stages=5).parameters())

    # weights: loaded strictly into the classifier before its head is dropped; frozen BN by default
    ref = lowformer.create_model("lowformer_b0")
    randomize_bn(ref)
    path = lowformer.save_checkpoint(ref, tmp_path / "b0.safetensors")
    loaded = create_backbone("lowformer_b0", checkpoint_path=path)
    assert loaded.frozen_bn
    state = {k.removeprefix("body.model."): v for k, v in loaded.state_dict().items()}
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in state.items())


def test_timm_backbone_with_frozen_stages_in_a_detector():
    model = retinanet_lowformer("timm:test_resnet", num_classes=3, trainable_stages=2, min_size=64, max_size=64)
    trainable = {n.split(".")[2] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}  # the deepest two of its five levels
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 80)])
    assert set(out) == {"boxes", "scores", "labels"}


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


def test_retinanet_trains_and_predicts():
    model = retinanet_lowformer("lowformer_b0", num_classes=4, min_size=128, max_size=128, **SMALL)
    neck = model.backbone
    assert neck.out_channels == 64 and neck.names == ["0", "1", "2", "p6", "p7"]
    assert neck.strides == [8, 16, 32, 64, 128]
    # anchors follow the strides: torchvision's RetinaNet set for strides 8-128
    assert model.anchor_generator.sizes[0] == (32, 40, 50) and model.anchor_generator.sizes[-1] == (512, 645, 812)
    batches = [synthetic.detection_batch(2, 128, num_classes=3, generator=_gen(i)) for i in range(2)]
    losses = train_detection(model, batches, steps=30, lr=3e-4)
    assert len(losses) == 30 and _falls(losses, 0.75), losses
    model.eval()
    images, _ = batches[0]
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for d in detections:
        n = len(d["boxes"])
        assert d["boxes"].shape == (n, 4) and d["scores"].shape == (n,) and d["labels"].dtype == torch.int64
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 128).all()


def test_fasterrcnn_trains():
    model = fasterrcnn_lowformer(
        "edgevit_xxs",
        num_classes=4,
        min_size=128,
        max_size=128,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
        **SMALL,
    )
    assert model.backbone.names == ["0", "1", "2", "3", "pool"]
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    batches = [synthetic.detection_batch(2, 128, num_classes=3, generator=_gen(i)) for i in range(2)]
    losses = train_detection(model, batches, steps=20, lr=1e-3)
    assert _falls(losses, 0.5), losses
    model.eval()
    with torch.no_grad():
        (d,) = model([batches[0][0][0]])
    assert d["boxes"].shape[1] == 4 and ((d["labels"] >= 1) & (d["labels"] <= 3)).all()


@pytest.mark.parametrize("kind", ["retinanet", "fasterrcnn"])
def test_detection_deploy_gives_the_same_outputs(kind):
    if kind == "retinanet":
        model = retinanet_lowformer("lowformer_b0", num_classes=3, **SMALL)
    else:
        model = fasterrcnn_lowformer("edgevit_xxs", num_classes=3, **SMALL)
    model.eval()
    randomize_bn(model)
    fast = deploy(model)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref_maps, maps = model.backbone(x), fast.backbone(x)
        assert list(ref_maps) == list(maps)
        for name in ref_maps:
            assert _rel(ref_maps[name], maps[name]) <= 1e-5, name
        if kind == "retinanet":
            ref, out = model.head(list(ref_maps.values())), fast.head(list(maps.values()))
            pairs = [(ref["cls_logits"], out["cls_logits"]), (ref["bbox_regression"], out["bbox_regression"])]
        else:
            ref, out = model.rpn.head(list(ref_maps.values())), fast.rpn.head(list(maps.values()))
            pairs = [(a, b) for r, o in zip(ref, out) for a, b in zip(r, o)]
    for a, b in pairs:
        assert _rel(a, b) <= 1e-5


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------


def test_semantic_fpn_trains_and_gives_full_resolution_logits():
    model = semantic_fpn_lowformer("lowformer_b0", num_classes=4, head_channels=32, **SMALL)
    assert [len(h) for h in model.head.scale_heads] == [1, 2, 4, 6]  # conv-norm-ReLU (+ 2x upsampling) to stride 4
    batches = [synthetic.segmentation_batch(2, 128, num_classes=3, generator=_gen(i)) for i in range(2)]
    losses = train_segmentation(model, batches, steps=30, lr=1e-3)
    assert _falls(losses, 0.4), losses
    model.eval()
    with torch.no_grad():
        for h, w in [(128, 128), (97, 131)]:  # any size, not only multiples of 32
            assert model(torch.randn(2, 3, h, w)).shape == (2, 4, h, w)
        images, masks = batches[0]
        accuracy = (model(images).argmax(1) == masks).float().mean().item()
    assert accuracy > 0.8


def test_semantic_fpn_pads_for_edgevit_and_deploys():
    model = semantic_fpn_lowformer("edgevit_xxs", num_classes=5, head_channels=32, **SMALL).eval()
    randomize_bn(model)
    fast = deploy(model)
    x = torch.randn(1, 3, 70, 100)  # EdgeViT needs multiples of 32: padded inside, cropped back
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert ref.shape == (1, 5, 70, 100)
    assert _rel(ref, out) <= 1e-5
    bn_head = semantic_fpn_lowformer("lowformer_b0", num_classes=3, norm_layer=nn.BatchNorm2d, **SMALL).eval()
    randomize_bn(bn_head)
    with torch.no_grad():
        assert _rel(bn_head(x), deploy(bn_head)(x)) <= 1e-5


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------


def _unit(angles_deg: list[float]) -> torch.Tensor:
    a = torch.tensor(angles_deg) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_retrieval_metrics_by_hand():
    gallery = _unit([0, 30, 60, 90])  # gallery images on the unit circle, at these angles (degrees)
    query = _unit([0, 100])
    # query 0 (class 0) ranks the gallery 0, 30, 60, 90 degrees: classes 0, 1, 0, 1, relevant at ranks 1 and 3;
    # query 1 (class 1) ranks it 90, 60, 30, 0: classes 1, 0, 1, 0, the same pattern
    r = retrieval_metrics(query, [0, 1], gallery, [0, 1, 0, 1], ks=(1, 2))
    ap = (1 / 1 + 2 / 3) / 2  # precision@1 and precision@3, over the 2 relevant images
    assert r.average_precision == pytest.approx([ap, ap]) and r.mean_average_precision == pytest.approx(ap)
    assert r.recall_at_k == {1: 1.0, 2: 1.0}
    # relevant at ranks 3 and 4 for both queries
    r = retrieval_metrics(_unit([0, 100]), [0, 1], gallery, [1, 1, 0, 0], ks=(1, 3))
    assert r.average_precision == pytest.approx([(1 / 3 + 2 / 4) / 2, (1 / 3 + 2 / 4) / 2])
    assert r.recall_at_k == {1: 0.0, 3: 1.0}
    # a query whose class is not in the gallery scores 0 (GPR1200) and is counted
    r = retrieval_metrics(_unit([0]), [7], gallery, [0, 1, 0, 1])
    assert r.mean_average_precision == 0 and r.queries_without_relevant == 1
    # the queries rank each other: leave-one-out by default, GPR1200's code keeps the query itself
    emb, labels = _unit([0, 10, 90, 100]), [0, 0, 1, 1]
    assert retrieval_metrics(emb, labels).mean_average_precision == pytest.approx(1.0)
    assert retrieval_metrics(emb, labels).num_gallery == 3
    assert retrieval_metrics(_unit([0, 95, 10, 100]), [0, 0, 1, 1]).recall_at_k[1] == 0.0
    assert retrieval_metrics(_unit([0, 95, 10, 100]), [0, 0, 1, 1], include_self=True).recall_at_k[1] == 1.0
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(emb, labels, ks=(0,))
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(emb, labels, emb)


def test_retrieval_map_matches_sklearn_average_precision():
    g = _gen(3)
    query, gallery = torch.randn(7, 16, generator=g), torch.randn(40, 16, generator=g)
    q_labels, g_labels = torch.randint(0, 4, (7,), generator=g), torch.randint(0, 4, (40,), generator=g)
    r = retrieval_metrics(query, q_labels, gallery, g_labels, chunk_size=3)
    sims = nn.functional.normalize(query, dim=1) @ nn.functional.normalize(gallery, dim=1).T
    want = [average_precision_score((g_labels == q).numpy(), s.numpy()) for q, s in zip(q_labels, sims)]
    assert r.average_precision == pytest.approx(want, rel=1e-6)


def test_embeddings_train_and_retrieve_from_folders(tmp_path):
    root = synthetic.write_retrieval_folders(tmp_path / "set", num_classes=4, query_per_class=2, gallery_per_class=4)
    model = embedding_lowformer("lowformer_b0", embed_dim=32)
    assert isinstance(model.pool, GeM) and model.embed_dim == 32
    before = evaluate_retrieval(model, root, image_size=64)
    assert before.num_queries == 8 and before.num_gallery == 16 and before.num_classes == 4
    batches = [synthetic.retrieval_batch(8, 64, num_classes=4, generator=_gen(i)) for i in range(20)]  # all new
    losses = train_retrieval(model, batches, num_classes=4, steps=20, lr=1e-3)
    assert _falls(losses, 0.5), losses
    after = evaluate_retrieval(model, root, image_size=64)  # images the model never saw
    assert after.mean_average_precision > max(0.85, before.mean_average_precision), (before, after)
    assert set(after.recall_at_k) == {1, 5, 10} and "mAP" in after.summary()
    # the single-folder layout: every image queries all the others
    loo = evaluate_retrieval(model, root / "gallery", image_size=64)
    assert loo.protocol == "leave-one-out" and loo.num_queries == 16 and loo.num_gallery == 15
    model.eval()
    with torch.no_grad():
        emb = model(torch.randn(3, 3, 64, 64))
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=1), torch.ones(3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        evaluate_retrieval(model, tmp_path / "empty")
    with pytest.raises(ValueError, match="read as GPR1200's layout <class>_<n>.jpg, but 2 file names have no class"):
        evaluate_retrieval(model, tmp_path / "set" / "query" / "class_0")  # images, but no classes


def test_embedding_deploy_and_average_pooling():
    model = embedding_lowformer("edgevit_xxs", embed_dim=None, pool_layer=AvgPool).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (2, 288)  # no projection: EdgeViT-XXS's last stage width
        assert _rel(ref, deploy(model)(x)) <= 1e-5
