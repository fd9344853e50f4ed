"""Training configuration: one dataclass tree loaded from a YAML or JSON file.

A config file has the sections ``model``, ``data``, ``optim`` and ``run`` plus top-level ``name``,
``seed`` and ``output_dir``. Unknown keys are errors (a typo must not silently fall back to a default).
``--set section.key=value`` overrides are parsed with YAML, so ``--set optim.lr=1e-4`` gives a float
and ``--set optim.betas=[0.9,0.99]`` a list. Relative paths are taken from the current directory.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from CTReasonerLib.errors import ConfigError, InputFileError

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
MODEL_SOURCES = ("tiny", "pretrained", "base")


@dataclass
class ModelSection:
    """Where the model to train comes from.

    source: ``tiny`` builds CTReasoner-Tiny from ``config``; ``base`` builds the real-scale model from
        ``config`` (local LVLM folder and segmenter checkpoint paths live there); ``pretrained`` starts
        from a saved model folder ``pretrained``.
    config: keyword overrides for ``CTReasonerConfig`` (loss weights, sizes, LoRA, paths).
    """
    source: str = "tiny"
    pretrained: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """The curated dataset to train on (``ctreasoner curate`` output).

    When ``root`` does not exist and ``phantoms`` is set, the trainer builds it first with
    ``ctreasoner curate --phantoms {phantoms} --seed {phantom_seed} --out {root}``.
    """
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    phantoms: Optional[int] = None
    phantom_seed: int = 0
    batch_size: int = 4
    num_workers: int = 0
    #: >1 fills batches with chunks of up to this many records of the same slice, so one image-encoder
    #: pass serves several queries (see ``GroupedDistributedSampler``); 1 shuffles records independently.
    records_per_slice: int = 1


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule; defaults are the paper's (§5.1)."""
    lr: float = 3e-4
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_accum_steps: int = 10
    max_grad_norm: Optional[float] = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    #: {parameter-name prefix: learning-rate factor}, e.g. {"dense_head.": 10} for heads new to a fine-tune
    lr_multipliers: Dict[str, float] = field(default_factory=dict)


@dataclass
class RunSection:
    """How long to train and what to write while training.

    A run stops at whichever limit comes first: ``epochs``, ``max_steps`` (optimizer steps) or
    ``max_minutes`` of wall time. The schedule decays over ``max_steps`` when set, else over ``epochs``.
    ``checkpoint_every`` / ``val_every`` / ``log_every`` count optimizer steps (0 disables).
    """
    epochs: int = 1
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0
    keep_last: int = 2
    val_every: int = 0
    val_samples: int = 16
    progress: bool = True
    deepspeed: Optional[str] = None


@dataclass
class TrainConfig:
    name: str = "ctreasoner"
    seed: int = 0
    output_dir: str = "outputs/train"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable(asdict(self))

    def validate(self) -> "TrainConfig":
        """Raise ConfigError on values that cannot work; return self."""
        checks = [
            (self.model.source in MODEL_SOURCES, f"model.source must be one of {MODEL_SOURCES}, got {self.model.source!r}"),
            (self.model.source != "pretrained" or bool(self.model.pretrained),
             "model.source is 'pretrained' but model.pretrained (a model folder) is not set"),
            (bool(self.data.root), "data.root (the curated dataset folder) is not set"),
            (self.data.batch_size >= 1, f"data.batch_size must be >= 1, got {self.data.batch_size}"),
            (self.data.num_workers >= 0, f"data.num_workers must be >= 0, got {self.data.num_workers}"),
            (self.data.records_per_slice >= 1, f"data.records_per_slice must be >= 1, got {self.data.records_per_slice}"),
            (self.data.phantoms is None or self.data.phantoms >= 1, "data.phantoms must be >= 1 when set"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
             f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.optim.grad_accum_steps >= 1, f"optim.grad_accum_steps must be >= 1, got {self.optim.grad_accum_steps}"),
            (self.optim.max_grad_norm is None or self.optim.max_grad_norm > 0, "optim.max_grad_norm must be > 0 or null"),
            (self.optim.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.optim.schedule!r}"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
            (self.run.epochs >= 1, f"run.epochs must be >= 1, got {self.run.epochs}"),
            (self.run.max_steps is None or self.run.max_steps >= 1, "run.max_steps must be >= 1 or null"),
            (self.run.max_minutes is None or self.run.max_minutes > 0, "run.max_minutes must be > 0 or null"),
            (self.run.precision in PRECISIONS, f"run.precision must be one of {PRECISIONS}, got {self.run.precision!r}"),
            (self.run.keep_last >= 1, "run.keep_last must be >= 1"),
            (min(self.run.log_every, self.run.checkpoint_every, self.run.val_every, self.run.val_samples) >= 0,
             "run.log_every, run.checkpoint_every, run.val_every and run.val_samples must be >= 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems),
                              hint="fix the config file or the --set overrides")
        return self


def load_train_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a ``.yaml``/``.yml``/``.json`` training config, apply ``key=value`` overrides, validate."""
    data = read_config_file(path)
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data).validate()


def read_config_file(path: str) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"training config not found: {path}", hint="pass a file such as configs/tiny_cpu.yaml")
    import yaml

    suffix = file.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"unknown config format {file.suffix!r} for {path}", hint="use .yaml, .yml or .json")
    try:
        data = json.loads(file.read_text()) if suffix == ".json" else yaml.safe_load(file.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse training config {path}: {exc}", hint="check the file's syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path} must hold a mapping at the top level")
    return data


def apply_override(data: Dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to the raw config mapping, in place."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", hint="e.g. --set optim.lr=1e-4")
    key, raw_value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse the value of override {item!r}: {exc}") from exc
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: Dict[str, Any]) -> TrainConfig:
    return _build_dataclass(TrainConfig, data, "")


def _build_dataclass(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {path or '<top>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(path + k for k in unknown)}",
                          hint=f"known keys in {path or 'the top level'}: {', '.join(sorted(known))}")
    values = {}
    for name, raw in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build_dataclass(hint, raw or {}, f"{path}{name}.")
        else:
            values[name] = _coerce(raw, hint, path + name)
    return cls(**values)


def _coerce(value: Any, hint, key: str):
    """Check/convert a scalar config value against its annotation (int -> float allowed, lists -> tuples)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(value, hint, key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        return list(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is typing.Any:
        return value
    raise ConfigError(f"config key {key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
