"""Grid files: expansion, stable run ids, overrides, and strict errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.config import ConfigError, RunConfig, from_dict, load_run_config
from harness.grid import LauncherConfig, load_grid

BASE = {"model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "seq_len": 32},
        "train": {"tokens": 4096, "batch_size": 4}}


def write(tmp_path: Path, spec: dict[str, Any], name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_sweep_is_the_cartesian_product_with_labels(tmp_path):
    path = write(tmp_path, {"base": BASE, "sweep": {"model.virtual_width": [[1, 1], [1, 2], [1, 8]],
                                                     "train.seed": [0, 1]}})
    grid = load_grid(path)
    assert grid.name == "grid" and grid.path == path
    assert grid.columns == ["model.virtual_width", "train.seed"]
    assert [run.label for run in grid.runs] == [
        {"model.virtual_width": w, "train.seed": s} for w in ([1, 1], [1, 2], [1, 8]) for s in (0, 1)]
    for run in grid.runs:
        assert run.config.model.virtual_width == tuple(run.label["model.virtual_width"])
        assert run.config.train.seed == run.label["train.seed"]
        assert run.config.model.d_model == 32 and run.config.train.tokens == 4096
        assert run.run_id == run.config.run_id()
    assert len({run.run_id for run in grid.runs}) == 6
    assert grid.runs[2].describe() == "model.virtual_width=[1,2], train.seed=0"


def test_run_ids_are_stable_and_depend_only_on_the_resolved_config(tmp_path):
    spec = {"name": "g", "base": BASE, "sweep": {"train.seed": [0, 1], "optim.lr": [1e-3, 3e-3]}}
    first = load_grid(write(tmp_path, spec, "a.yaml"))
    again = load_grid(write(tmp_path, spec, "a.yaml"))
    reordered = load_grid(write(tmp_path, spec | {"sweep": {"optim.lr": [3e-3, 1e-3], "train.seed": [1, 0]}},
                                "b.yaml"))
    ids = [run.run_id for run in first.runs]
    assert ids == [run.run_id for run in again.runs]
    assert sorted(ids) == sorted(run.run_id for run in reordered.runs)
    # the same config written out in full, without a grid, has the same id
    explicit = from_dict(RunConfig, BASE | {"train": BASE["train"] | {"seed": 1}, "optim": {"lr": 1e-3}})
    assert explicit.run_id() in ids
    changed = load_grid(write(tmp_path, spec | {"base": BASE | {"model": BASE["model"] | {"n_layers": 2}}}))
    assert not set(ids) & {run.run_id for run in changed.runs}


def test_variants_are_named_and_crossed_with_the_sweep(tmp_path):
    spec = {"base": BASE,
            "variants": {"baseline": None, "wide": {"model.virtual_width": [2, 4], "model.embedding": "factorized"}},
            "sweep": {"train.seed": [0, 1]}}
    grid = load_grid(write(tmp_path, spec))
    assert grid.columns == ["variant", "train.seed"]
    assert [(r.label["variant"], r.label["train.seed"]) for r in grid.runs] == [
        ("baseline", 0), ("baseline", 1), ("wide", 0), ("wide", 1)]
    wide = grid.runs[2].config.model
    assert wide.virtual_width == (2, 4) and wide.embedding == "factorized"
    assert grid.runs[0].config.model.virtual_width == (1, 1)


def test_a_grid_without_sweep_is_its_base_run(tmp_path):
    grid = load_grid(write(tmp_path, {"base": BASE}))
    assert len(grid.runs) == 1 and grid.runs[0].label == {} and grid.runs[0].describe() == "base"


def test_launcher_settings_and_overrides(tmp_path):
    spec = {"name": "g", "base": BASE, "sweep": {"train.seed": [0, 1]},
            "launcher": {"cluster": "slurm", "partition": "cpu", "timeout_min": 30, "mem_gb": 4,
                         "sbatch": {"constraint": "avx2", "exclusive": True}}}
    grid = load_grid(write(tmp_path, spec), ["train.tokens=8192", "launcher.array_parallelism=2"])
    assert grid.launcher == LauncherConfig(cluster="slurm", partition="cpu", timeout_min=30, mem_gb=4.0,
                                           array_parallelism=2, sbatch={"constraint": "avx2", "exclusive": True})
    assert {run.config.train.tokens for run in grid.runs} == {8192}
    assert [run.config.train.seed for run in grid.runs] == [0, 1]
    assert load_grid(write(tmp_path, {"base": BASE})).launcher == LauncherConfig()


@pytest.mark.parametrize("spec, overrides, message", [
    ({"base": BASE, "sweeps": {}}, [], "sweeps: unknown key; did you mean 'sweep'?"),
    ({"base": BASE, "sweep": {"model.d_modle": [64]}}, [],
     "sweep.model.d_modle: unknown key; did you mean 'model.d_model'?"),
    ({"base": BASE, "sweep": {"train.seed": []}}, [], "sweep.train.seed: empty list"),
    ({"base": BASE, "sweep": {"train.seed": 3}}, [], "sweep.train.seed: expected a list of values, got 3"),
    ({"base": BASE, "sweep": {"model.d_model": [64, "wide"]}}, [],
     "sweep.model.d_model: expected an integer, got 'wide'"),
    ({"base": BASE, "sweep": {"model.virtual_width": [[1, 1], [3, 6]]}}, [],
     "sweep.model.virtual_width: m must divide d_model=32"),
    ({"base": BASE, "sweep": {"model.d_model": [32, 30]}}, [],
     "sweep.model.d_model: value 30: model.n_heads: head dim d_model/n_heads must be even"),
    ({"base": BASE, "sweep": "train.seed"}, [], "sweep: expected a mapping"),
    ({"base": {"model": {"d_modle": 64}}}, [], "base.model.d_modle: unknown key; did you mean 'model.d_model'?"),
    ({"base": {"optim": {"schedule": "linear"}}}, [], "base.optim.schedule: expected one of 'constant', 'cosine'"),
    ({"base": BASE, "launcher": {"partiton": "cpu"}}, [],
     "launcher.partiton: unknown key; did you mean 'partition'?"),
    ({"base": BASE, "launcher": {"cluster": "k8s"}}, [], "launcher.cluster: expected one of 'local', 'slurm'"),
    ({"base": BASE, "launcher": {"max_parallel": 0}}, [], "launcher.max_parallel: must be >= 1, got 0"),
    ({"base": BASE, "launcher": {"sbatch": {"gres": [1]}}}, [], "launcher.sbatch.gres: expected a string"),
    ({"base": BASE, "variants": {}}, [], "variants: empty"),
    ({"base": BASE, "variants": {"a": {"model.mpt": True}}}, [],
     "variants.a.model.mpt: unknown key; did you mean 'model.mtp'?"),
    ({"base": BASE, "variants": {"a": None, "b": {"train.seed": 0}}}, [],
     "runs variant=a and variant=b resolve to the same config"),
    ({"base": BASE, "sweep": {"model.d_model": [32, 36], "model.n_heads": [2, 4]}}, [],
     "run model.d_model=36, model.n_heads=4: model.n_heads: head dim d_model/n_heads must be even"),
    ({"base": BASE, "name": "my grid"}, [], "name: must be a folder name"),
    ({"base": BASE}, ["train.tokns=5"], "--set train.tokns: unknown key; did you mean 'train.tokens'?"),
    ({"base": BASE}, ["launcher.clustr=slurm"], "launcher.clustr: unknown key; did you mean 'cluster'?"),
])
def test_errors_name_the_file_and_the_key(tmp_path, spec, overrides, message):
    path = write(tmp_path, spec)
    with pytest.raises(ConfigError) as error:
        load_grid(path, overrides)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_grid(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match=f"{bad}: expected a mapping at the top level"):
        load_grid(bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_shipped_experiment_file_loads(path: Path) -> None:
    """Grid files (they have a `base`) expand to validated runs; the others are run configs for vwn train."""
    if "base" in yaml.safe_load(path.read_text()):
        assert load_grid(path).runs
    else:
        assert load_run_config(path).max_steps > 0
