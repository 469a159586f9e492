"""Model-layer unit tests on tiny random-weight BERTs: pooling, padding, stages, LR decay, LoRA, the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.backbone import BackboneError, HeadOnly, layer_id, num_blocks
from models.stages import StageSpec, add_lora, frozen_features, merge_lora, param_groups, set_trainable, train_stage
from models.text import TextAdapter
from models.trainer import FitPlan, evaluate
from tasks.finetune import Encoded


@pytest.fixture
def tiny(tiny_bert_dir: Path) -> tuple[TextAdapter, torch.nn.Module]:
    torch.manual_seed(0)
    adapter = TextAdapter(max_length=16)
    return adapter, adapter.build(str(tiny_bert_dir), num_labels=2)


def test_dynamic_padding_pads_to_the_longest_in_the_batch(tiny: tuple) -> None:
    adapter, _ = tiny
    ids = adapter.encode(["short", "a somewhat longer sentence here", "x " * 100])
    assert len(ids[2]) == 16, "truncated to max_length"
    batch = adapter.collate(ids[:2])
    assert batch["input_ids"].shape == (2, len(ids[1]))
    assert batch["attention_mask"][0].sum() == len(ids[0]) and batch["attention_mask"][1].all()


def test_mean_pooling_ignores_padding(tiny: tuple) -> None:
    adapter, model = tiny
    model.eval()
    ids = adapter.encode(["hello there", "a much longer sentence to force padding on the first"])
    alone = model.features(**adapter.collate(ids[:1]))
    padded = model.features(**adapter.collate(ids))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_layer_ids_and_layer_wise_decay(tiny: tuple) -> None:
    _, model = tiny
    n = num_blocks(model)
    assert n == 2
    assert layer_id("encoder.embeddings.word_embeddings.weight", n) == 0
    assert layer_id("encoder.encoder.layer.1.attention.self.query.weight", n) == 2
    assert layer_id("head.weight", n) == 3
    set_trainable(model, "full")
    groups = param_groups(model.named_parameters(), lr=1.0, weight_decay=0.1, layer_decay=0.5, n_blocks=n)
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    assert lr_of["head.weight"] == 1.0
    assert lr_of["encoder.encoder.layer.1.output.dense.weight"] == 0.5
    assert lr_of["encoder.encoder.layer.0.output.dense.weight"] == 0.25
    assert lr_of["encoder.embeddings.word_embeddings.weight"] == 0.125
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert wd_of["head.bias"] == 0.0 and wd_of["encoder.embeddings.LayerNorm.weight"] == 0.0
    assert wd_of["head.weight"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage_freezing_policies(tiny: tuple) -> None:
    _, model = tiny
    set_trainable(model, "probe")
    assert trainable_names(model) == {"head.weight", "head.bias"}
    set_trainable(model, "partial", top_k_blocks=1)
    names = trainable_names(model)
    assert any(".layer.1." in n for n in names) and not any(".layer.0." in n for n in names)
    assert not any("embeddings" in n for n in names) and "head.weight" in names
    set_trainable(model, "full")
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="unknown stage kind"):
        set_trainable(model, "distill")


def test_lora_trains_adapters_only_and_merges_exactly(tiny: tuple) -> None:
    adapter, model = tiny
    add_lora(model, adapter.lora_targets, r=4, alpha=8, dropout=0.0)
    set_trainable(model, "lora")
    names = trainable_names(model)
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.eval()
    batch = adapter.collate(adapter.encode(["merge me exactly", "and me"]))
    before = model(**batch)
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(**batch), before, atol=1e-4, rtol=1e-4)


def encoded_tiny(adapter: TextAdapter, tiny_text_data: Path) -> Encoded:
    from runconfig import DataConfig
    from tasks.data import load_dataset

    ds = load_dataset(DataConfig(modality="text", path=tiny_text_data, dvc_file=None))
    return Encoded(*((adapter.encode(ds.split(s).items), ds.split(s).labels) for s in ("train", "validation", "test")))


def test_full_stage_learns_and_keeps_the_best_checkpoint(tiny: tuple, tiny_text_data: Path, tmp_path: Path) -> None:
    adapter, model = tiny
    data = encoded_tiny(adapter, tiny_text_data)
    val = data.batches(adapter, "validation", 8)
    spec = StageSpec(kind="full", epochs=6, lr=3e-3, layer_decay=0.9)
    result = train_stage(
        model,
        spec,
        lambda e: data.batches(adapter, "train", 8, seed=e),
        val,
        FitPlan(epochs=6),
        tmp_path / "best.st",
        [],
    )
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert evaluate(model, val, "cpu")["macro_f1"] == pytest.approx(result.best_metric)
    assert result.best_metric == max(row["val_macro_f1"] for row in result.history)
    assert (tmp_path / "best.st").is_file()


def test_probe_on_cached_features_trains_the_shared_head(tiny: tuple, tiny_text_data: Path, tmp_path: Path) -> None:
    from models.batching import feature_batches

    adapter, model = tiny
    data = encoded_tiny(adapter, tiny_text_data)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    feats = {s: frozen_features(model, data.batches(adapter, s, 8), "cpu") for s in ("train", "validation")}
    assert feats["train"].shape == (len(data.train[1]), 32)
    spec = StageSpec(kind="probe", epochs=3, lr=1e-2)
    train_stage(
        model,
        spec,
        lambda e: feature_batches(feats["train"], data.train[1], 8, e),
        feature_batches(feats["validation"], data.validation[1], 8, None),
        FitPlan(epochs=3),
        tmp_path / "p.st",
        [],
    )
    assert not torch.equal(model.head.weight, head_before)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), f"probe changed encoder weight {key}"
    model.eval()
    direct = model(**data.batches(adapter, "validation", 100)[0][0])
    via_cache = HeadOnly(model).eval()(feats["validation"])
    torch.testing.assert_close(direct, via_cache, atol=1e-5, rtol=1e-4)


def test_bad_backbones_fail_clearly(tmp_path: Path) -> None:
    adapter = TextAdapter()
    with pytest.raises(BackboneError, match="does not exist"):
        adapter.build(str(tmp_path / "no" / "such" / "model"), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="not a model directory"):
        adapter.build(str(tmp_path / "empty"), 2)
