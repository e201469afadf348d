"""Grid files: expand an experiment YAML into validated RunConfigs with stable run ids.

    name: width_sweep            # results go to results/<name>/ (default: the file's stem)
    base:                        # a partial RunConfig shared by every run
      model: {d_model: 128, mtp: true}
      train: {tokens: 2_000_000}
    sweep:                       # dotted key -> list of values; runs are the cartesian product
      model.virtual_width: [[1, 1], [1, 2], [1, 8]]
      train.seed: [0, 1]
    variants:                    # optional named alternatives that are not a product of keys;
      direct: {}                 # each is a mapping of dotted keys, crossed with every sweep point
      factorized: {model.embedding: factorized}
    launcher: {cluster: local, max_parallel: 2}   # LauncherConfig

Every run is resolved and validated when the file is loaded, before anything starts: an unknown key, an
empty sweep or a bad value raises `ConfigError` naming the file and the dotted key. A run's id is
`RunConfig.run_id()`, a hash of its complete resolved config, so the same grid always yields the same ids.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.config import (
    ConfigError,
    RunConfig,
    dotted_to_nested,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
)

TOP_LEVEL_KEYS = ("name", "base", "sweep", "variants", "launcher")
SBATCH_VALUE = str | int | float | bool


@dataclass(frozen=True)
class LauncherConfig:
    """How a grid's runs are executed. `vwn submit --cluster/--max-parallel` override the first keys."""

    cluster: Literal["local", "slurm", "debug"] = "local"  # debug: in-process, one run after another
    max_parallel: int = 1  # local: runs at once; the machine's cores are shared evenly among them
    timeout_min: int = 1440  # per job attempt; on timeout the run checkpoints and is requeued
    max_requeues: int = 3  # timeouts a run survives (requeues after preemption are not counted)
    # SLURM only: one job array per grid (per distinct train.devices, which sets tasks per node)
    array_parallelism: int = 64  # array tasks running at once (sbatch --array=...%N)
    partition: str = ""  # "" = the cluster's default partition
    cpus_per_task: int = 1  # cores per process; also its torch thread count
    gpus_per_node: int = 0
    mem_gb: float = 0.0  # 0 = the partition's default
    account: str = ""
    qos: str = ""
    sbatch: dict[str, SBATCH_VALUE] = field(default_factory=dict)  # extra flags, e.g. {constraint: a100}

    def __post_init__(self) -> None:
        for name in ("max_parallel", "timeout_min", "array_parallelism", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_requeues", "gpus_per_node", "mem_gb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Run:
    """One cell of a grid: its id, its complete config, and what distinguishes it from its siblings."""

    run_id: str
    config: RunConfig
    label: dict[str, Any]  # {"variant": name} (if the grid has variants) then swept key -> value

    def describe(self) -> str:
        return describe_label(self.label)


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    launcher: LauncherConfig
    runs: tuple[Run, ...]

    @property
    def columns(self) -> list[str]:
        """The label keys shared by every run: 'variant' and the swept keys."""
        return list(self.runs[0].label)


def format_value(value: Any) -> str:
    """Compact one-line rendering of a config value for tables: [2, 3] -> '[2,3]'."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def describe_label(label: dict[str, Any]) -> str:
    """{'variant': 'wide', 'train.seed': 1} -> 'variant=wide, train.seed=1' ('base' when empty)."""
    return ", ".join(f"{key}={format_value(value)}" for key, value in label.items()) or "base"


def _problem(path: Path, section: str, error: ConfigError) -> ConfigError:
    return ConfigError(f"{path}: {section}{error}")


def _mapping(value: Any, path: Path, key: str) -> dict[str, Any]:
    """`value` as a dict (None counts as empty), or a ConfigError naming the file and key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key}: expected a mapping, got {value!r}")
    return value


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{'model.d_model': 64, 'train': {'seed': 1}} -> {'model': {'d_model': 64}, 'train': {'seed': 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        out = merge(out, dotted_to_nested(str(key), value))
    return out


def _check(data: dict[str, Any], path: Path, section: str) -> RunConfig:
    """Resolve `data` into a RunConfig; errors name the file and `section` before the dotted key."""
    try:
        return from_dict(RunConfig, data)
    except ConfigError as error:
        raise _problem(path, section, error) from None


def _check_sweep_value(base: dict[str, Any], key: str, value: Any, path: Path) -> None:
    try:
        from_dict(RunConfig, merge(base, dotted_to_nested(key, value)))
    except ConfigError as error:
        message = str(error)
        if re.match(rf"{re.escape(key)}[:.\[]", message):  # the key itself is unknown, or the value's type
            raise ConfigError(f"{path}: sweep.{message}") from None
        raise ConfigError(f"{path}: sweep.{key}: value {format_value(value)}: {message}") from None


def _load_sweep(raw: Any, base: dict[str, Any], path: Path) -> dict[str, list[Any]]:
    sweep = _mapping(raw, path, "sweep")
    for key, values in sweep.items():
        if not isinstance(values, list):
            raise ConfigError(f"{path}: sweep.{key}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{path}: sweep.{key}: empty list; give at least one value")
        for value in values:
            _check_sweep_value(base, str(key), value, path)
    return sweep


def _load_variants(raw: Any, base: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    if raw is not None and not raw:
        raise ConfigError(f"{path}: variants: empty; name at least one variant or remove the key")
    variants = {str(name): _nested(_mapping(value, path, f"variants.{name}"))
                for name, value in _mapping(raw, path, "variants").items()}
    for name, overrides in variants.items():
        _check(merge(base, overrides), path, f"variants.{name}.")
    return variants


def _load_launcher(raw: Any, overrides: dict[str, Any], path: Path) -> LauncherConfig:
    data = merge(_mapping(raw, path, "launcher"), overrides)
    sbatch = _mapping(data.pop("sbatch", None), path, "launcher.sbatch")
    for flag, value in sbatch.items():
        if not isinstance(value, SBATCH_VALUE):
            raise ConfigError(f"{path}: launcher.sbatch.{flag}: expected a string, number or true/false, "
                              f"got {value!r}")
    try:
        launcher = from_dict(LauncherConfig, data)
    except ConfigError as error:
        raise _problem(path, "launcher.", error) from None
    return dataclasses.replace(launcher, sbatch={str(k): v for k, v in sbatch.items()})


def _grid_name(raw: Any, path: Path) -> str:
    name = path.stem if raw is None else raw
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"{path}: name: must be a folder name (letters, digits, '_', '.', '-'), got {name!r}")
    return name


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read and fully validate a grid file. `overrides` are `--set key=value` items: `launcher.*` keys
    change the launcher, every other key is applied to every run, after its variant and sweep values."""
    path = Path(path)
    data = read_yaml(path)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: {key}: unknown key{hint} (valid keys: {', '.join(TOP_LEVEL_KEYS)})")
    run_overrides = parse_overrides(overrides or [])
    launcher = _load_launcher(data.get("launcher"), run_overrides.pop("launcher", {}), path)
    base = _mapping(data.get("base"), path, "base")
    _check(base, path, "base.")
    _check(merge(base, run_overrides), path, "--set ")
    sweep = _load_sweep(data.get("sweep"), base, path)
    variants = _load_variants(data.get("variants"), base, path)

    runs: dict[str, Run] = {}
    for (variant, changes), values in itertools.product(variants.items() or [(None, {})],
                                                        itertools.product(*sweep.values())):
        label = ({"variant": variant} if variants else {}) | dict(zip(sweep, values, strict=True))
        resolved = merge(base, changes)
        for key, value in zip(sweep, values, strict=True):
            resolved = merge(resolved, dotted_to_nested(key, value))
        config = _check(merge(resolved, run_overrides), path, f"run {describe_label(label)}: ")
        run = Run(config.run_id(), config, label)
        if run.run_id in runs:
            raise ConfigError(f"{path}: runs {runs[run.run_id].describe()} and {run.describe()} resolve to "
                              f"the same config (run {run.run_id}); drop one of them")
        runs[run.run_id] = run
    return Grid(name=_grid_name(data.get("name"), path), path=path, launcher=launcher,
                runs=tuple(runs.values()))
