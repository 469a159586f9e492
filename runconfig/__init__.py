"""RunConfig: one validated, frozen object per run, built once at the edge of the program.

YAML → `--set a.b=value` overrides → pydantic. Unknown keys and wrong types are errors that
name the key and the file. Flows unpack the sub-configs and pass explicit arguments on;
models never see this module.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used, with the file and the offending keys named."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the labelled splits live and how to read them."""

    modality: Literal["text", "image"] = "text"
    path: Path = Path("data/tweets")
    format: Literal["auto", "jsonl", "csv", "imagefolder", "npy"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = Field(
        default=None, description="Expected class names; every one must have training examples."
    )
    train_limit: int | None = Field(default=None, ge=1, description="Stratified subsample of train.")
    validation_limit: int | None = Field(default=None, ge=1, description="Stratified subsample of validation.")
    test_limit: int | None = Field(default=None, ge=1, description="Stratified subsample of test.")
    skip_corrupt: bool = Field(default=False, description="Skip unreadable images (counted) instead of failing.")
    dvc_file: Path | None = Field(default=Path("data.dvc"), description="DVC file pinning the data; None: unversioned.")


class BackboneConfig(_Strict):
    """Which pretrained encoder to start from."""

    uri: str = Field(
        default="minilm",
        description="'minilm' (the packaged all-MiniLM-L6-v2), a Hugging Face checkpoint dir or hub id, "
        "'models:/name@alias' from the MLflow registry, or 'torchvision:<arch>:<weights.pth>'.",
    )
    max_length: int = Field(default=128, ge=8, le=4096, description="Text: truncate to this many tokens.")
    image_size: int = Field(default=224, ge=8, le=1024, description="Vision: square input size in pixels.")
    hflip: bool = Field(default=True, description="Vision: random horizontal flips in training (off for digits, text).")
    mean: list[float] | None = Field(default=None, description="Vision: normalisation mean (default: backbone's).")
    std: list[float] | None = Field(default=None, description="Vision: normalisation std (default: backbone's).")
    augment: Literal["none", "light", "trivial", "randaugment"] = Field(
        default="light",
        description="Vision, training batches: none; light (per-image random crop/shift/flip); trivial / "
        "randaugment (light + torchvision v2 TrivialAugmentWide / RandAugment).",
    )
    random_erasing: float = Field(default=0.0, ge=0, le=1, description="Vision: v2 RandomErasing probability.")


StageKind = Literal["probe", "partial", "full", "lora"]


class StageConfig(_Strict):
    """One stage of the staged fine-tuning schedule."""

    kind: StageKind
    name: str | None = None
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    layer_decay: float = Field(default=1.0, gt=0, le=1, description="LR factor per block below the top.")
    top_k_blocks: int = Field(default=2, ge=1, description="partial: how many top blocks train.")
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0, lt=1)
    patience: int | None = Field(default=None, ge=1, description="Early stopping: epochs without improvement.")
    steps: int | None = Field(
        default=None, ge=1, description="A budget of optimizer steps instead of `epochs` (small data sets)."
    )
    eval_rounds: int = Field(default=10, ge=1, description="With `steps`: validations along the budget.")
    schedule: Literal["linear", "cosine"] = Field(default="linear", description="LR decay after warmup.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    mixup_alpha: float = Field(default=0.0, ge=0, description="Vision: v2 MixUp alpha (0: off).")
    cutmix_alpha: float = Field(default=0.0, ge=0, description="Vision: v2 CutMix alpha (0: off).")

    @property
    def label(self) -> str:
        return self.name or self.kind


class TrainingConfig(_Strict):
    """Loop settings shared by every stage."""

    seed: int = 42
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int = Field(default=128, ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool | None = Field(default=None, description="None: on where CUDA supports it.")
    compile: bool | None = Field(default=None, description="None: on with CUDA.")
    checkpoint_every_steps: int = Field(default=200, ge=1)
    num_threads: int | None = Field(default=None, ge=1)
    system_metrics: bool = Field(
        default=False, description="Sample CPU, memory, disk and network (GPU where present) into the MLflow run."
    )
    system_metrics_interval_s: float = Field(default=10.0, gt=0, description="Seconds between system samples.")
    processes: int = Field(
        default=1, ge=1, description="Data-parallel (DDP) processes per stage on this machine, via torchrun."
    )


class EvaluationConfig(_Strict):
    metric: Literal["macro_f1", "accuracy"] = "macro_f1"
    baselines: bool = Field(
        default=True, description="Evaluate the modality's classical baseline and the frozen-backbone probe."
    )
    select: Literal["best", "last"] = Field(
        default="best", description="Which stage's weights are the run's model: best validation metric, or last."
    )


class RegistryConfig(_Strict):
    model_name: str = Field(default="tweets-sentiment", min_length=1)
    experiment: str = "transflow"
    tracking_uri: str | None = Field(default=None, description="None: MLFLOW_TRACKING_URI or the local store.")
    enabled: bool = Field(default=True, description="Register (and export) the model; off for experiments.")
    auto_promote: bool = False
    margin: float = 0.0
    require_beats_baselines: bool = Field(
        default=True, description="The gate refuses a version that lost to a baseline of its own run."
    )
    require_significance: bool = Field(
        default=False,
        description="The gate refuses a challenger whose improvement is not significant in its candidate report "
        "(paired bootstrap CI excludes 0 and McNemar rejects at `significance_level`).",
    )
    significance_level: float = Field(default=0.05, gt=0, lt=0.5, description="Test level; the CI is at 1 − level.")


class ExportConfig(_Strict):
    enabled: bool = True
    opset: int = Field(default=18, ge=13)
    int8: bool = True
    int8_budget_pt: float = Field(default=0.5, ge=0, description="Max macro-F1 drop (points) to ship int8.")
    int8_class_budget_pt: float | None = Field(
        default=2.0, ge=0, description="Max F1 drop (points) of any one class to ship an int8 rung; null: unchecked."
    )
    ladder: list[Literal["dynamic", "static", "static_mixed"]] = Field(
        default=["dynamic", "static", "static_mixed"],
        description="int8 rungs tried, in this order (pick=first: until one keeps both budgets).",
    )
    pick: Literal["fastest", "first"] = Field(
        default="fastest",
        description="fastest: every rung is tried; of those within both budgets and fp32, the one fastest at "
        "batch 1 here ships (int8 can be slower than fp32 for small models); first: the first rung within both "
        "budgets ships, whatever its speed (a faster export).",
    )
    calibration_size: int = Field(default=128, ge=8, le=4096, description="Static int8: validation examples.")
    report: bool = Field(default=True, description="Build the candidate report after the export.")
    distill: bool = Field(
        default=False,
        description="After the export (and auto-promotion), distil the new version (`transflow "
        "distill`, settings in `distill:`): a student that ships becomes the challenger.",
    )
    distill_min_speedup: float = Field(
        default=1.5,
        gt=0,
        description="A distilled student ships only if its shipped ONNX file is at least this "
        "many times faster at batch 1 than the teacher's, measured side by side (`transflow distill`).",
    )


class DistillConfig(_Strict):
    """`transflow distill`: a student with part of the teacher's encoder blocks, trained on the teacher's logits."""

    layers: int | None = Field(default=None, ge=1, description="Blocks the student keeps; None: half, rounded up.")
    steps: int = Field(default=300, ge=1, description="Optimizer steps over the training split.")
    lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=32, ge=1)
    eval_rounds: int = Field(default=4, ge=1, description="Validations along the steps; the best weights are kept.")
    temperature: float = Field(default=2.0, gt=0, description="Softens both logits in the KL term.")
    alpha: float = Field(default=0.9, ge=0, le=1, description="Weight of the KL term; 1 − alpha: cross-entropy.")
    budget_pt: float | None = Field(
        default=None, ge=0, description="Max macro-F1 drop (points) vs the teacher; None: export.int8_budget_pt."
    )
    class_budget_pt: float | None = Field(
        default=None, ge=0, description="Max drop of any class's F1 (points); None: export.int8_class_budget_pt."
    )


class DeployConfig(_Strict):
    targets: list[str] = Field(default_factory=list)
    token_env: str = "TRANSFLOW_EDGE_TOKEN"


class RunConfig(_Strict):
    """Everything one run needs, and nothing else."""

    name: str = "run"
    output_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    stages: list[StageConfig] = Field(min_length=1)
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()
    export: ExportConfig = ExportConfig()
    deploy: DeployConfig = DeployConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _unique_stage_names(self) -> RunConfig:
        labels = [s.label for s in self.stages]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes} (give each a 'name')")
        return self

    def resolved(self) -> dict[str, Any]:
        """The config as plain JSON values: what gets logged and hashed."""
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        return config_hash(self.resolved())

    def workdir(self, data_version: str) -> Path:
        """Where this config on one data version keeps its stages, plots, model and export: re-runs resume here."""
        return self.output_dir / f"{self.name}-{data_version[:8]}-{self.config_hash()[:8]}"


def config_hash(resolved: dict[str, Any]) -> str:
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, 1e-4, true, [a])."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. training.seed=7")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        node = _child(node, key, ".".join(keys[: i + 1]), create=True)
    last = keys[-1]
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(node, list):
        node[_index(node, last, dotted)] = value
    else:
        node[last] = value


def _child(node: Any, key: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {where}: parent is a value, not a mapping")
    if key not in node and create:
        node[key] = {}
    return node[key]


def _index(node: list[Any], key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"--set {where}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a YAML run config; errors name the file and each bad key."""
    return _load(path, overrides, RunConfig)  # type: ignore[return-value]


def _load(path: Path | str, overrides: list[str] | tuple[str, ...], schema: type[BaseModel]) -> BaseModel:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None


def format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} invalid setting(s)"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


class PretrainSettings(_Strict):
    """The self-supervised (or supervised source-task) objective and its budget."""

    objective: Literal["mim", "mlm", "supervised"]
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    mask_ratio: float = Field(default=0.5, gt=0, lt=1, description="mim: share of patches hidden; mlm: of tokens.")
    schedule: Literal["linear", "cosine"] = Field(default="linear", description="supervised: LR decay.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="supervised: cross-entropy smoothing.")


class PretrainConfig(_Strict):
    """A pretraining run: its result is registered as a backbone model (alias `latest`)."""

    name: str = "pretrain"
    output_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    pretrain: PretrainSettings
    training: TrainingConfig = TrainingConfig()
    registry: RegistryConfig = RegistryConfig(model_name="backbone")

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        return config_hash(self.resolved())


def load_pretrain_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    return _load(path, overrides, PretrainConfig)  # type: ignore[return-value]
