"""The run configuration: one typed, validated object for a training job.

A YAML file gives the sections below; `--set section.key=value` overrides any leaf. Values are coerced to the
field's declared type, unknown keys are an error that lists the valid ones and names the file, and the loss
section is `magface.losses.LossConfig` itself, so its feasibility check (lambda_g bound) applies on load.
The config travels to Ray workers as a plain dict (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from magface.preprocess import NAMED_CONVENTIONS, PixelConvention


class ConfigError(ValueError):
    """A bad configuration: the message names the source (file or --set) and the field."""


# A config is a few dozen values: these bounds are far above any real one and far below what hurts.
MAX_YAML_DEPTH = 32  # nesting of mappings/lists
MAX_ALIAS_NODES = 1000  # nodes that all aliases together may re-use (a "billion laughs" file expands to 9^9)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only) that also refuses duplicate keys, deep nesting and aliases
    whose expansion exceeds MAX_ALIAS_NODES nodes; errors name the file and line."""

    def __init__(self, stream, name: str):
        super().__init__(stream)
        self._name, self._depth, self._alias_nodes, self._sizes = name, 0, 0, {}

    def _where(self, mark) -> str:
        return f"{self._name}:{mark.line + 1}" if mark is not None else self._name

    def _size(self, node) -> int:  # nodes in the expansion of `node`, memoised (aliases make it a DAG)
        n = self._sizes.get(id(node))
        if n is None:
            kids = node.value if isinstance(node, yaml.SequenceNode) else \
                [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else ()
            n = self._sizes[id(node)] = 1 + sum(self._size(k) for k in kids)
        return n

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self.anchors:
                self._alias_nodes += self._size(self.anchors[event.anchor])
                if self._alias_nodes > MAX_ALIAS_NODES:
                    raise ConfigError(f"{self._where(event.start_mark)}: YAML aliases expand to more than "
                                      f"{MAX_ALIAS_NODES} nodes; write the values out instead of aliasing them")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{self._where(self.peek_event().start_mark)}: nested deeper than "
                                  f"{MAX_YAML_DEPTH} levels; a config has sections of plain values")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    raise ConfigError(f"{self._where(key_node.start_mark)}: a mapping key must be a plain "
                                      "value") from None
                if first is not key_node.start_mark:
                    raise ConfigError(f"{self._where(key_node.start_mark)}: duplicate key {key!r} (first at "
                                      f"line {first.line + 1}); keep one")
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, name: str):
    """Plain data from YAML text, through `_StrictLoader`; every failure is a ConfigError naming `name`."""
    loader = _StrictLoader(text, name)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML ({e})") from e
    finally:
        loader.dispose()


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # .rec paths (local or s3://); .idx beside each
    num_classes: int = 0
    num_images: Optional[int] = None  # None: counted from the dataset before training
    image_size: int = 112
    # Images of another size than image_size: False stops at the first one (naming its shard and key), True
    # resizes them (bilinear). Resizing does not align faces: convert with --align (docs/own_faces.md).
    resize: bool = False
    flip: bool = True
    shuffle: str = "full"  # "full": global random shuffle per epoch; "local": block order + buffer; "none"
    local_shuffle_buffer: int = 2048
    pixel_convention: str = "insightface"  # a name from magface.preprocess.NAMED_CONVENTIONS
    seed: int = 0
    # The demo's synthetic data (magface.data.synthetic.generate keywords, e.g. bin_pairs, eval_q_beta,
    # eval_identity_spread); num_train_ids and image_size come from num_classes and image_size.
    synthetic: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.synthetic:
            from magface.data.synthetic.writers import DEFAULTS as synth_defaults

            bad = sorted(set(self.synthetic) - (set(synth_defaults) - {"num_train_ids", "image_size"}))
            if bad:
                raise ConfigError(f"{where}: data.synthetic: unknown key(s) {bad}; valid: "
                                  f"{sorted(set(synth_defaults) - {'num_train_ids', 'image_size'})}")
        if self.shuffle not in ("full", "local", "none"):
            raise ConfigError(f"{where}: data.shuffle must be 'full', 'local' or 'none', got {self.shuffle!r}")
        if self.pixel_convention not in NAMED_CONVENTIONS:
            raise ConfigError(f"{where}: data.pixel_convention {self.pixel_convention!r} unknown; "
                              f"known: {sorted(NAMED_CONVENTIONS)}")
        _positive(where, "data.image_size", self.image_size)
        if self.num_images is not None:
            _positive(where, "data.num_images", self.num_images)
        _positive(where, "data.local_shuffle_buffer", self.local_shuffle_buffer)
        _in_range(where, "data.seed", self.seed, 0, None)

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
    # A project checkpoint (a folder holding model.pt, e.g. from `magface import-weights`) whose backbone
    # weights start training; only the backbone: the classifier starts fresh. Its BN eps is used unless
    # backbone_kwargs sets one. Ignored when the run resumes from its own checkpoint.
    init_from: Optional[str] = None

    def resolved_feature_scale(self, loss) -> bool:
        """The feature BatchNorm's scale setting for this loss (see `trainable_feature_scale`)."""
        if self.trainable_feature_scale is not None:
            return bool(self.trainable_feature_scale)
        return bool(loss.uses_magnitude)

    def validate(self, where: str) -> None:
        _positive(where, "model.embedding_size", self.embedding_size)
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"{where}: model.sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.init_from and "://" not in str(self.init_from):
            from pathlib import Path

            p = Path(self.init_from).expanduser()
            if not (p / "model.pt").is_file() and not (p.is_file() and p.suffix == ".pt"):
                raise ConfigError(f"{where}: model.init_from {self.init_from!r}: no model.pt there (a project "
                                  "checkpoint folder; convert other weights with `magface import-weights`)")


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
        _in_range(where, "optim.momentum", self.momentum, 0, 1, hi_open=True)
        _positive(where, "optim.gamma", self.gamma)
        _positive(where, "optim.power", self.power)
        if self.schedule not in ("step", "poly"):
            raise ConfigError(f"{where}: optim.schedule must be 'step' or 'poly', got {self.schedule!r}")
        bad = [m for m in self.milestones if not (isinstance(m, int) and not isinstance(m, bool) and m >= 0)]
        if bad:
            raise ConfigError(f"{where}: optim.milestones must be epoch numbers (ints >= 0), got {bad[0]!r} in "
                              f"{self.milestones}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"{where}: optim.milestones must be increasing, got {self.milestones}")
        if self.warmup_epochs < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: optim.warmup_epochs, grad_clip and weight_decay must be >= 0")


@dataclass
class TrainConfig:
    name: str = "magface"  # the job name: rerunning the same name and storage_path resumes it
    storage_path: str = "~/ray_results"  # local folder or s3://bucket/prefix
    epochs: int = 25
    batch_size: int = 64  # per worker (fixed scaling.num_workers); see global_batch_size for elastic runs
    # The global batch, held fixed whatever the worker count (batch policy, docs/operations.md): each of W
    # workers takes global_batch_size // W samples, the first global_batch_size % W one more, and the lr
    # schedule is unchanged. None: batch_size x scaling.num_workers (its maximum when elastic).
    global_batch_size: Optional[int] = None
    checkpoint_every_steps: Optional[int] = None  # also checkpoint inside epochs, every this many steps
    channels_last: bool = False  # backbone and images in NHWC memory layout (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the backbone
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
        for key in ("global_batch_size", "checkpoint_every_steps"):
            if getattr(self, key) is not None:
                _positive(where, f"train.{key}", getattr(self, key))
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch <= 0:
            raise ConfigError(f"{where}: train.max_steps_per_epoch must be > 0, or null for whole epochs; got "
                              f"{self.max_steps_per_epoch}")
        _in_range(where, "train.max_failures", self.max_failures, -1, None)  # -1: retry forever (Ray)
        _positive(where, "train.num_to_keep", self.num_to_keep)
        _in_range(where, "train.seed", self.seed, 0, None)
        for key in ("fault_kill_rank", "fault_kill_step"):
            if getattr(self, key) is not None:
                _in_range(where, f"train.{key}", getattr(self, key), 0, None)


@dataclass
class ScalingConfig:
    num_workers: Any = 1  # an int, or [min, max]: Ray Train's elastic mode (any worker count in the range)
    elastic_resize_interval_s: float = 60.0  # elastic: how often a healthy group checks for more resources
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    resources_per_worker: dict = field(default_factory=dict)  # extra custom resources

    def validate(self, where: str) -> None:
        n = self.num_workers
        if isinstance(n, (list, tuple)):
            if len(n) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in n) \
                    or not 1 <= n[0] <= n[1]:
                raise ConfigError(f"{where}: scaling.num_workers must be an int or [min, max] with "
                                  f"1 <= min <= max, got {n!r}")
            self.num_workers = list(n)
        elif isinstance(n, int) and not isinstance(n, bool):
            _positive(where, "scaling.num_workers", n)
        else:
            raise ConfigError(f"{where}: scaling.num_workers must be an int or [min, max], got {n!r}")
        if self.elastic_resize_interval_s < 0:
            raise ConfigError(f"{where}: scaling.elastic_resize_interval_s must be >= 0")
        _in_range(where, "scaling.cpus_per_worker", self.cpus_per_worker, 0, None)
        if self.use_gpu:
            _positive(where, "scaling.gpus_per_worker", self.gpus_per_worker)
        for name, amount in self.resources_per_worker.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
                raise ConfigError(f"{where}: scaling.resources_per_worker.{name} must be a number >= 0, "
                                  f"got {amount!r}")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "magface"
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else MLflow's local default
    log_every: int = 50  # steps between metric logs (rank 0) and console lines
    run_id: Optional[str] = None  # filled in by the driver so workers log into the same run
    # the final checkpoint's backbone as an MLflow model (pyfunc around the Embedder; mlflow.pyfunc.load_model)
    log_model: bool = True
    registered_model: Optional[str] = None  # also register it under this name in the model registry

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
        _check_finite(d, where, "")
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
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start}: {raw[e.start:e.start + 4]!r}); "
                              "save the config as UTF-8") from None
        d = load_yaml_text(text, str(path)) or {}
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
        if self.data.num_classes < self.scaling.max_workers:
            raise ConfigError(f"{where}: data.num_classes {self.data.num_classes} < scaling.num_workers "
                              f"{self.scaling.max_workers}: each worker holds a shard of the classifier; use at "
                              f"most {self.data.num_classes} workers")
        if self.model.sync_bn and self.scaling.max_workers > 1 and not self.scaling.use_gpu:
            raise ConfigError(f"{where}: model.sync_bn needs scaling.use_gpu: true (torch's SyncBatchNorm has no "
                              "CPU kernel); set model.sync_bn: false for CPU training")
        self._check_backbone(where)
        if self.train.fault_kill_rank is not None and self.train.fault_kill_rank >= self.scaling.max_workers:
            raise ConfigError(f"{where}: train.fault_kill_rank {self.train.fault_kill_rank} >= "
                              f"scaling.num_workers {self.scaling.num_workers}")
        if self.global_batch_size < self.scaling.max_workers:
            raise ConfigError(f"{where}: the global batch of {self.global_batch_size} cannot give each of "
                              f"{self.scaling.max_workers} workers a sample (batch policy: the global batch is "
                              f"fixed and split across the workers); raise train.global_batch_size to at least "
                              f"{self.scaling.max_workers} or lower the maximum of scaling.num_workers")

    def _check_backbone(self, where: str) -> None:
        """Build the backbone on PyTorch's "meta" device (shapes only, no memory, ~0.1 s): an unknown name,
        an unknown model.backbone_kwargs key or a size the network refuses fails here, not inside a worker."""
        import torch

        from magface.models import BACKBONES, get_backbone

        m = self.model
        if m.backbone not in BACKBONES:
            raise ConfigError(f"{where}: model.backbone {m.backbone!r} unknown; known: {list(BACKBONES)}")
        kwargs = {"trainable_feature_scale": m.resolved_feature_scale(self.loss), **m.backbone_kwargs}
        try:
            with torch.device("meta"):
                get_backbone(m.backbone, embedding_size=m.embedding_size, input_size=self.data.image_size, **kwargs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{where}: model.backbone {m.backbone!r} with model.embedding_size "
                              f"{m.embedding_size}, data.image_size {self.data.image_size} and "
                              f"model.backbone_kwargs {m.backbone_kwargs}: {e}") from None

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, whatever the number of workers (the batch policy)."""
        if self.train.global_batch_size is not None:
            return self.train.global_batch_size
        return self.train.batch_size * self.scaling.max_workers


# ---------------------------------------------------------------------- helpers
def _positive(where: str, name: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{where}: {name} must be > 0, got {value!r}")


def _in_range(where: str, name: str, value, lo, hi, lo_open: bool = False, hi_open: bool = False) -> None:
    """`value` within [lo, hi] (open ends as asked; None: unbounded), else one message with the range."""
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and \
         (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        span = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}" \
               f"{')' if hi_open or hi is None else ']'}"
        raise ConfigError(f"{where}: {name} must be in {span}, got {value!r}")


def _check_finite(value, where: str, key: str) -> None:
    """No NaN or infinity anywhere in the raw config (YAML's .nan/.inf): they only ever give a NaN loss."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key or 'value'} must be a finite number, got {value!r}")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, where, f"{key}[{i}]")


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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
            return number
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
        value = load_yaml_text(raw, f"{where}: --set {item!r}") if raw.strip() else ""
    except ConfigError as e:
        if not isinstance(e.__cause__, yaml.YAMLError):
            raise
        value = raw
    sec = d.setdefault(section, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{where}: section {section!r} is not a mapping")
    sec[leaf] = value
