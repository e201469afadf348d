"""Run configuration: nested dataclasses, and strict YAML <-> dataclass conversion.

Every knob lives in exactly one field with a default. A YAML file (or a `--set key=value`
override) may only name fields that exist; a wrong key or value raises `ConfigError` naming the
file, the dotted key and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.model.config import ModelConfig


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "builtin"  # "builtin", a text file, a folder or glob of text files, or a .bin/.npy token file
    tokenizer: Literal["bpe", "byte"] = "bpe"  # byte-level BPE trained on the training split, or raw bytes
    val_fraction: float = 0.02  # share of the text held out: whole documents (a lone file's tail, a token file's end)
    val_tokens: int = 32768  # size of the fixed held-out set evaluated every train.val_every steps
    cache_dir: str = ""  # tokenizers and token memmaps; "" = $VWN_CACHE or ~/.cache/vwn-harness

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction: must be in (0, 0.5), got {self.val_fraction}")
        if self.val_tokens < 1:
            raise ValueError(f"data.val_tokens: must be >= 1, got {self.val_tokens}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.lr <= 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas: must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 2_000_000  # training budget in tokens seen (batch_size · seq_len · grad_accum per step)
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10  # steps between rows of metrics.csv
    val_every: int = 100  # steps between evaluations of the held-out set
    checkpoint_every: int = 100  # steps between writes of checkpoints/last.ckpt
    devices: int = 1  # processes (DDP over gloo on CPU)
    precision: Literal["32-true", "bf16-mixed"] = "32-true"
    # torch.compile the model, one graph up to the chunked losses (first step: compilation); on CPU in fp32, with
    # the fused kernels, it gained 0.4-3.1 % a step (README, Performance)
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "grad_accum", "log_every", "val_every", "checkpoint_every", "devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"train.seed: must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.model.seq_len * self.train.devices

    @property
    def max_steps(self) -> int:
        return max(1, self.train.tokens // self.tokens_per_step)

    def run_id(self) -> str:
        """Short stable hash of the complete resolved config: same config, same id."""
        blob = json.dumps(to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


# ----------------------------------------------------------------------------- dict <-> dataclass


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), suitable for YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(config)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return f"a list of {len(args)} values, each {_describe(args[0])}"
    plain = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return plain.get(hint, f"a {getattr(hint, '__name__', str(hint))}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    problem = f"{key}: expected {_describe(hint)}, got {value!r}"
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(problem)
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(problem)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(problem)
    if hint is type(None):
        if value is not None:
            raise ConfigError(problem)
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(problem)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(problem)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(problem)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(problem)
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) nested dict, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint} (valid keys: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = from_dict(hints[key], value, dotted + ".")
        else:
            kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ConfigError(str(error)) from None


# ----------------------------------------------------------------------------- YAML and overrides


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of `update` win, nested mappings merge key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(key: str, value: Any) -> dict[str, Any]:
    """'model.d_model', 256 -> {'model': {'d_model': 256}}."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['model.d_model=256', 'model.virtual_width=[2,3]'] -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.d_model=256")
        out = merge(out, dotted_to_nested(key.strip(), yaml.safe_load(raw)))
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML (partial: defaults fill the rest) and apply `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    try:
        return from_dict(RunConfig, data)
    except ConfigError as error:
        raise ConfigError(f"{path or '--set'}: {error}") from None


def dump_run_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
