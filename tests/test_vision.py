"""Vision adapter on tiny random ViTs, torchvision weights from a local file, and the vision flows end to end:
MIM pretraining registers a backbone that the retraining flow then loads, trains, registers and exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from transflow_edge.bundle import verify_bundle

from models.backbone import BackboneError, layer_id, num_blocks
from models.stages import set_trainable
from models.vision import VisionAdapter, load_image
from tests.conftest import ROOT


def test_grayscale_rgb_and_arrays_become_the_same_normalised_rgb_tensor(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)).save(tmp_path / "rgba.png")
    adapter = VisionAdapter(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batch = adapter.collate([tmp_path / "g.png", tmp_path / "rgb.png", tmp_path / "rgba.png", gray])["pixel_values"]
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    for i in range(1, 4):
        torch.testing.assert_close(batch[i], batch[0])
    expected = (np.asarray(load_image(gray).resize((16, 16), Image.BILINEAR), np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(batch[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_images_of_unexpected_sizes_are_resized_and_training_augments(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((5, 9), (40, 30, 3), (16, 16))]
    adapter = VisionAdapter(image_size=16, hflip=False)
    assert adapter.collate(items)["pixel_values"].shape == (3, 3, 16, 16)
    torch.testing.assert_close(adapter.collate(items)["pixel_values"], adapter.collate(items)["pixel_values"])
    torch.manual_seed(0)
    train_a = adapter.collate(items, train=True)["pixel_values"]
    train_b = adapter.collate(items, train=True)["pixel_values"]
    assert not torch.equal(train_a, train_b), "training batches are augmented"


def test_scratch_vit_builds_trains_its_blocks_and_pools_cls() -> None:
    adapter = VisionAdapter(image_size=16)
    model = adapter.build("scratch:vit-tiny", num_labels=4)
    logits = model(**adapter.collate([np.zeros((16, 16), np.uint8)] * 2))
    assert logits.shape == (2, 4)
    n = num_blocks(model)
    names = [name for name, _ in model.named_parameters()]
    block3 = next(name for name in names if ".3." in name)
    assert n == 4 and layer_id(block3, n) == 4 and layer_id(names[0], n) == 0
    set_trainable(model, "partial", top_k_blocks=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".3." in t for t in trainable) and not any(".2." in t for t in trainable)
    assert "head.weight" in trainable and not any("embeddings" in t for t in trainable)
    with pytest.raises(ValueError, match="unknown scratch ViT"):
        adapter.build("scratch:vit-huge", 2)


def test_torchvision_weights_load_from_a_local_file(tmp_path: Path) -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    adapter = VisionAdapter(image_size=32)
    model = adapter.build(f"torchvision:resnet18:{tmp_path / 'resnet18.pth'}", num_labels=3).eval()
    assert adapter.mean == (0.485, 0.456, 0.406), "ImageNet normalisation for torchvision weights"
    torch.testing.assert_close(model.encoder.net.conv1.weight, net.conv1.weight)
    assert model(**adapter.collate([np.zeros((32, 32, 3), np.uint8)])).shape == (1, 3)
    model.encoder.save_pretrained(tmp_path / "saved")
    again = VisionAdapter(image_size=32).build(str(tmp_path / "saved"), 3)
    torch.testing.assert_close(again.encoder.net.fc.weight, model.encoder.net.fc.weight)
    with pytest.raises(BackboneError, match="does not exist"):
        adapter.build(f"torchvision:resnet18:{tmp_path / 'missing.pth'}", 3)
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="does not fit"):
        adapter.build(f"torchvision:resnet18:{tmp_path / 'bad.pth'}", 3)


@pytest.mark.slow
@pytest.mark.integration
def test_mim_pretraining_registers_a_backbone_the_retraining_flow_transfers(
    prepared_data: Path, tmp_path: Path
) -> None:
    from flows.pretrain import pretrain_flow
    from flows.retrain import retrain

    store = f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    common = [store, f"output_dir={tmp_path / 'runs'}", "data.dvc_file=null"]
    pre = pretrain_flow(
        str(ROOT / "configs/smoke-pretrain-vision.yaml"), [*common, f"data.path={prepared_data / 'fashion-mnist'}"]
    )
    assert pre["backbone"] == "models:/smoke-vit-mim@latest" and pre["history"][0]["loss"] > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    backbone = client.get_model_version("smoke-vit-mim", pre["version"])
    assert backbone.tags["objective"] == "mim" and backbone.tags["kind"] == "backbone"

    summary = retrain(
        str(ROOT / "configs/smoke-vision.yaml"),
        [*common, f"data.path={prepared_data / 'digits'}", "backbone.uri=models:/smoke-vit-mim@latest"],
    )
    version = client.get_model_version("smoke-vision", summary["model_version"])
    assert version.tags["backbone"] == "models:/smoke-vit-mim@latest"
    assert version.tags["exported"] == "true" and version.tags["onnx.parity_passed"] == "true"
    bundle = verify_bundle(Path(summary["export"]["bundle_dir"]))
    assert bundle.manifest["modality"] == "image" and bundle.sha256 == version.tags["bundle_sha256"]
    spec = bundle.json("preprocessing.json")
    assert spec["image_size"] == 16 and spec["channels"] == 3 and len(spec["mean"]) == 3
    assert [i["name"] for i in bundle.manifest["inputs"]] == ["pixel_values"]
    assert json.loads(version.tags["classes"]) == [str(d) for d in range(10)]


@pytest.mark.slow
@pytest.mark.integration
def test_mlm_pretraining_registers_a_text_backbone(prepared_data: Path, tmp_path: Path) -> None:
    from flows.pretrain import pretrain_flow
    from models.text import TextAdapter
    from tasks.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pre = pretrain_flow(
        str(ROOT / "configs/smoke-pretrain-text.yaml"),
        [
            f"registry.tracking_uri={uri}",
            f"output_dir={tmp_path / 'runs'}",
            "data.dvc_file=null",
            f"data.path={prepared_data / 'tweets'}",
        ],
    )
    local = Tracker(uri).download(pre["backbone"], tmp_path / "dl")
    adapter, reference_adapter = TextAdapter(max_length=16), TextAdapter(max_length=16)
    model = adapter.build(str(local), num_labels=3)
    reference = reference_adapter.build("minilm", 3).encoder.state_dict()
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, reference[k])]
    assert changed, "MLM changed the encoder weights"
    assert adapter.tokenizer.get_vocab() == reference_adapter.tokenizer.get_vocab(), "the backbone ships its tokenizer"


def test_image_cache_decodes_once_like_the_edge_and_memory_maps_large_splits(tmp_path: Path) -> None:
    from models.image_cache import ImageCache

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (16, 16), dtype=np.uint8), rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)]
    Image.fromarray(arrays[1]).save(tmp_path / "x.png")
    items = [arrays[0], arrays[1], tmp_path / "x.png"]
    adapter = VisionAdapter(image_size=16)
    cache = adapter.encode(items)
    assert isinstance(cache, ImageCache) and cache.data.dtype == torch.uint8 and cache.data.shape == (3, 3, 16, 16)
    from_cache = adapter.collate(cache.take([0, 1, 2]))["pixel_values"]
    torch.testing.assert_close(from_cache, adapter.collate(items)["pixel_values"])
    mapped = ImageCache.build(items, 16, mmap_bytes=0)  # every split "large": an unlinked np.memmap file
    assert torch.equal(mapped.data, cache.data) and mapped.mapped and not cache.mapped


def test_batch_augmentation_draws_per_image_and_none_is_the_plain_resize() -> None:
    from models.augment import AugmentSpec, BatchAugment

    torch.manual_seed(0)
    same = torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8).repeat(8, 1, 1, 1)
    for policy in ("light", "trivial", "randaugment"):
        out = BatchAugment(AugmentSpec(policy=policy, erasing=0.5))(same)
        assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
        assert len({tuple(x.flatten()[:64].tolist()) for x in out}) > 4, f"{policy}: images augmented independently"
    torch.testing.assert_close(BatchAugment(AugmentSpec(policy="none"))(same), same.float() / 255)
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        AugmentSpec(policy="heavy")


def test_conv_stem_vit_saves_and_reloads_with_its_stem(tmp_path: Path) -> None:
    adapter = VisionAdapter(image_size=16)
    model = adapter.build("scratch:vit-mini-conv", 3).eval()
    stem = model.encoder.embeddings.patch_embeddings.projection
    assert type(stem).__name__ == "ConvStem" and model.encoder.embeddings.patch_embeddings.num_patches == 16
    model.encoder.save_pretrained(tmp_path / "enc")
    again = VisionAdapter(image_size=16).build(str(tmp_path / "enc"), 3).eval()
    x = adapter.collate([np.full((16, 16), 7, np.uint8), np.eye(16, dtype=np.uint8) * 255])
    torch.testing.assert_close(again.features(**x), model.features(**x))


def test_a_mim_pretrained_conv_stem_encoder_reloads_every_weight(tmp_path: Path) -> None:
    """MIM pretraining saves its `ViTForMaskedImageModeling.vit`, which transformers writes in the old ViT key
    layout; the conv-stem class must load all of it (its blocks once stayed random, with only a warning)."""
    from models.pretraining import mim_model

    adapter = VisionAdapter(image_size=28)
    encoder = mim_model(adapter.build("scratch:vit-tiny-c7", 3).encoder).vit.eval()
    with torch.no_grad():
        for p in encoder.parameters():  # not the init: a reload that re-initialises anything must differ
            p.add_(torch.randn_like(p))
    encoder.save_pretrained(tmp_path / "enc")
    reloaded = VisionAdapter(image_size=28).build(str(tmp_path / "enc"), 3).encoder.eval()
    saved = {k: v for k, v in encoder.state_dict().items() if "mask_token" not in k}
    assert saved.keys() == reloaded.state_dict().keys()
    assert all(torch.equal(saved[k], reloaded.state_dict()[k]) for k in saved)


def test_a_checkpoint_missing_weights_is_refused_not_reinitialised(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from models.backbone import BackboneError

    VisionAdapter(image_size=28).build("scratch:vit-tiny-c7", 3).encoder.save_pretrained(tmp_path / "enc")
    weights = tmp_path / "enc" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".0." not in k}, weights)  # drop block 0
    with pytest.raises(BackboneError, match="weights missing from the checkpoint"):
        VisionAdapter(image_size=28).build(str(tmp_path / "enc"), 3)


def test_a_step_budget_runs_exactly_that_many_steps_over_several_passes() -> None:
    from models.batching import Batches, shuffled
    from models.stages import step_budget

    labels = list(range(10))
    train = lambda e: Batches(list(range(10)), labels, 4, lambda r: {"x": torch.tensor(r)}, shuffled(10, e))  # noqa: E731
    rounds_of, rounds = step_budget(train, steps=25, rounds=5)
    assert rounds == 5 and [len(rounds_of(r)) for r in range(rounds)] == [5] * 5
    seen = [int(v) for r in range(rounds) for inputs, _ in rounds_of(r) for v in inputs["x"]]
    assert len(seen) >= 25 * 2 and set(seen) == set(range(10)), "passes over the whole set, reshuffled"


def test_scratch_resnet_is_a_torchvision_encoder_that_saves_and_reloads(tmp_path: Path) -> None:
    adapter = VisionAdapter(image_size=28, hflip=False)
    model = adapter.build("scratch:resnet18", 4).eval()
    x = adapter.collate(adapter.encode([np.full((28, 28), 9, np.uint8), np.eye(28, dtype=np.uint8) * 255]))
    assert model(**x).shape == (2, 4)
    model.encoder.save_pretrained(tmp_path / "r18")
    again = VisionAdapter(image_size=28).build(str(tmp_path / "r18"), 4).eval()
    torch.testing.assert_close(again.features(**x), model.features(**x))
