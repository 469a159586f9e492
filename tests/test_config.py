from __future__ import annotations

from pathlib import Path

import pytest

from runconfig import ConfigError, RunConfig, load_config, load_pretrain_config
from tests.conftest import ROOT

GOOD = """
name: t
data: {modality: text, path: data/tweets}
stages:
  - {kind: probe, epochs: 2, lr: 0.01}
  - {kind: full, lr: 3.0e-5, layer_decay: 0.9}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name: str) -> None:
    if "pretrain" in name:
        assert load_pretrain_config(ROOT / "configs" / name).pretrain.objective in {"mim", "mlm", "supervised"}
    else:
        assert load_config(ROOT / "configs" / name).stages, name


def test_good_yaml_gives_frozen_config_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert [s.kind for s in cfg.stages] == ["probe", "full"]
    assert cfg.stages[1].layer_decay == 0.9
    assert cfg.training.seed == 42
    with pytest.raises(ValueError):
        cfg.training.seed = 1  # type: ignore[misc]


def test_overrides_set_nested_values_and_list_items(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), ["training.seed=7", "stages.0.lr=0.5", "data.labels=[a, b]"])
    assert cfg.training.seed == 7
    assert cfg.stages[0].lr == 0.5
    assert cfg.data.labels == ["a", "b"]


def test_config_hash_changes_with_any_value(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_config(path).config_hash() == load_config(path).config_hash()
    assert load_config(path).config_hash() != load_config(path, ["training.seed=1"]).config_hash()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.colour=red"], "data.colour: unknown key"),
        (["stages.0.lr=0"], "stages.0.lr: Input should be greater than 0"),
        (["stages.1.kind=distill"], "stages.1.kind: Input should be 'probe', 'partial', 'full' or 'lora'"),
        (["training.batch_size=many"], "training.batch_size: Input should be a valid integer"),
        (["stages=[]"], "stages: List should have at least 1 item"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, overrides: list[str], expected: str) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_unknown_top_level_key_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="colour: unknown key"):
        load_config(write(tmp_path, GOOD + "colour: red\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "stages: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, GOOD), ["training.seed"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(write(tmp_path, GOOD), ["stages.5.lr=1"])


def test_duplicate_stage_names_rejected() -> None:
    with pytest.raises(ValueError, match="repeated"):
        RunConfig.model_validate({"stages": [{"kind": "full"}, {"kind": "full"}]})
