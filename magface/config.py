"""The run configuration: one typed, validated object for a training job.

A YAML file gives the sections below; `--set section.key=value` overrides any leaf. Values are coerced to the
field's declared type, unknown keys are an error that lists the valid ones and names the file, and the loss
section is `magface.losses.LossConfig` itself, so its feasibility check (lambda_g bound) applies on load.
The config travels to Ray workers as a plain dict (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from magface.preprocess import NAMED_CONVENTIONS, PixelConvention


class ConfigError(ValueError):
    """A bad configuration: the message names the source (file or --set) and the field."""


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # .rec paths (local or s3://); .idx beside each
    num_classes: int = 0
    num_images: Optional[int] = None  # None: counted from the dataset before training
    image_size: int = 112
    flip: bool = True
    shuffle: str = "full"  # "full": global random shuffle per epoch; "local": block order + buffer; "none"
    local_shuffle_buffer: int = 2048
    pixel_convention: str = "insightface"  # a name from magface.preprocess.NAMED_CONVENTIONS
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.shuffle not in ("full", "local", "none"):
            raise ConfigError(f"{where}: data.shuffle must be 'full', 'local' or 'none', got {self.shuffle!r}")
        if self.pixel_convention not in NAMED_CONVENTIONS:
            raise ConfigError(f"{where}: data.pixel_convention {self.pixel_convention!r} unknown; "
                              f"known: {sorted(NAMED_CONVENTIONS)}")
        _positive(where, "data.image_size", self.image_size)
        if self.num_images is not None:
            _positive(where, "data.num_images", self.num_images)

    @property
    def convention(self) -> PixelConvention:
        return PixelConvention.named(self.pixel_convention)


@dataclass
class ModelConfig:
    backbone: str = "iresnet100"
    embedding_size: int = 512
    backbone_kwargs: dict = field(default_factory=dict)  # e.g. {width: 32} for "small"
    sync_bn: bool = False
    # BatchNorm normalises with its running statistics (fine-tuning); the step then no longer depends on how
    # the global batch is split across workers
    freeze_bn: bool = False
    sample_rate: float = 1.0  # partial-FC class sampling in the sharded classifier (1.0: all classes)
    # Train the final feature BatchNorm's scale (official MagFace) or freeze it at 1 (arcface_torch).
    # None follows the loss: trainable for the MagFace kinds, whose magnitude must be free to move.
    trainable_feature_scale: Optional[bool] = None

    def resolved_feature_scale(self, loss) -> bool:
        """The feature BatchNorm's scale setting for this loss (see `trainable_feature_scale`)."""
        if self.trainable_feature_scale is not None:
            return bool(self.trainable_feature_scale)
        return bool(loss.uses_magnitude)

    def validate(self, where: str) -> None:
        _positive(where, "model.embedding_size", self.embedding_size)
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"{where}: model.sample_rate must be in (0, 1], got {self.sample_rate}")


@dataclass
class OptimConfig:
    lr: float = 0.1  # for the global batch (workers x batch_size); not rescaled automatically
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # "step": x gamma at each milestone epoch; "poly": warmup then polynomial decay
    milestones: list = field(default_factory=lambda: [10, 18, 22])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    power: float = 2.0
    grad_clip: float = 5.0  # max global L2 norm of the backbone gradient; 0 disables

    def validate(self, where: str) -> None:
        _positive(where, "optim.lr", self.lr)
        if self.schedule not in ("step", "poly"):
            raise ConfigError(f"{where}: optim.schedule must be 'step' or 'poly', got {self.schedule!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"{where}: optim.milestones must be increasing, got {self.milestones}")
        if self.warmup_epochs < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: optim.warmup_epochs, grad_clip and weight_decay must be >= 0")


@dataclass
class TrainConfig:
    name: str = "magface"  # the job name: rerunning the same name and storage_path resumes it
    storage_path: str = "~/ray_results"  # local folder or s3://bucket/prefix
    epochs: int = 25
    batch_size: int = 64  # per worker
    amp: str = "none"  # "none", "bf16" or "fp16" (fp16 uses a GradScaler); margin math is always fp32
    seed: int = 0
    max_failures: int = 3
    num_to_keep: int = 2  # checkpoints kept (best by checkpoint_score, else the latest)
    checkpoint_score: Optional[str] = None  # a reported metric, e.g. "train_acc"; None keeps the latest
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (benchmarks, tests)
    fault_kill_rank: Optional[int] = None  # fault injection: this rank exits hard once, at fault_kill_step
    fault_kill_step: Optional[int] = None

    def validate(self, where: str) -> None:
        _positive(where, "train.epochs", self.epochs)
        _positive(where, "train.batch_size", self.batch_size)
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"{where}: train.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if (self.fault_kill_rank is None) != (self.fault_kill_step is None):
            raise ConfigError(f"{where}: set both train.fault_kill_rank and train.fault_kill_step, or neither")


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    resources_per_worker: dict = field(default_factory=dict)  # extra custom resources

    def validate(self, where: str) -> None:
        _positive(where, "scaling.num_workers", self.num_workers)


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "magface"
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else MLflow's local default
    log_every: int = 50  # steps between metric logs (rank 0) and console lines
    run_id: Optional[str] = None  # filled in by the driver so workers log into the same run

    def validate(self, where: str) -> None:
        _positive(where, "tracking.log_every", self.log_every)


@dataclass
class EvalConfig:
    data_root: Optional[str] = None  # folder holding verification .bin files / IJB layout
    benchmarks: list = field(default_factory=list)  # names understood by magface.evaluation.runner
    at_end: bool = True

    def validate(self, where: str) -> None:
        pass


def _loss_type():
    from magface.losses import LossConfig

    return LossConfig


SECTIONS = ("data", "model", "loss", "optim", "train", "scaling", "tracking", "eval")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Any = field(default_factory=lambda: _loss_type()())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "<dict>") -> "Config":
        d = dict(d or {})
        _check_keys(d, SECTIONS, where, "top level")
        kwargs = {}
        for name in SECTIONS:
            section_type = _section_type(name)
            value = d.get(name) or {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: section {name!r} must be a mapping, got {type(value).__name__}")
            kwargs[name] = _build_section(section_type, value, where, name)
        cfg = cls(**kwargs)
        cfg.validate(where)
        return cfg

    @staticmethod
    def read_yaml(path: str | Path) -> dict:
        """A config file's raw sections (each copied into a plain dict), with errors that name the file."""
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(d, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections {list(SECTIONS)}")
        return {k: copy.deepcopy(dict(v)) if isinstance(v, Mapping) else v for k, v in d.items()}

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "Config":
        """YAML file (or defaults when None), then `section.key=value` overrides, then validation."""
        where = str(path) if path else "<defaults>"
        d = cls.read_yaml(path) if path else {}
        d.pop("tune", None)  # the sweep settings, read by pipelines/tune.py; one YAML serves both jobs
        for item in overrides:
            apply_override(d, item, where)
        if overrides:
            where = f"{where} with --set {' '.join(overrides)}"
        return cls.from_dict(d, where)

    def validate(self, where: str = "<config>") -> None:
        for name in SECTIONS:
            section = getattr(self, name)
            try:
                section.validate(where) if name != "loss" else section.validate()
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(f"{where}: {name}: {e}") from None
        if self.data.num_classes <= 0:
            raise ConfigError(f"{where}: data.num_classes must be > 0 (the number of identities)")
        if self.train.fault_kill_rank is not None and self.train.fault_kill_rank >= self.scaling.num_workers:
            raise ConfigError(f"{where}: train.fault_kill_rank {self.train.fault_kill_rank} >= "
                              f"scaling.num_workers {self.scaling.num_workers}")

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @property
    def global_batch_size(self) -> int:
        return self.train.batch_size * self.scaling.num_workers


# ---------------------------------------------------------------------- helpers
def _positive(where: str, name: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{where}: {name} must be > 0, got {value!r}")


def _section_type(name: str):
    if name == "loss":
        return _loss_type()
    return typing.get_type_hints(Config)[name]


def _check_keys(d: Mapping, valid, where: str, what: str) -> None:
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in {what}; valid keys: {sorted(valid)}")


def _build_section(section_type, values: Mapping, where: str, name: str):
    hints = typing.get_type_hints(section_type)
    names = [f.name for f in dataclasses.fields(section_type) if f.init]
    _check_keys(values, names, where, f"section {name!r}")
    kwargs = {k: coerce(v, hints[k], where, f"{name}.{k}") for k, v in values.items()}
    try:
        return section_type(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: section {name!r}: {e}") from None


def coerce(value, hint, where: str, key: str):
    """Convert a YAML/--set value to the declared type; ints are accepted for floats, not the reverse."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], where, key)
    target = origin or hint
    if target is Any:
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif target in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    elif target is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise ConfigError(f"{where}: {key} expects {getattr(target, '__name__', target)}, got {value!r}")


def apply_override(d: dict, item: str, where: str) -> None:
    """`section.key=value` into the raw dict; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"{where}: --set {item!r} must look like section.key=value (sections: {list(SECTIONS)})")
    key, raw = item.split("=", 1)
    section, leaf = key.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"{where}: --set {item!r}: unknown section {section!r}; valid: {list(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    sec = d.setdefault(section, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{where}: section {section!r} is not a mapping")
    sec[leaf] = value
