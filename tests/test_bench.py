"""`vwn bench`: width selection, time attribution, and the files it writes (on a toy config)."""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys

import pytest
import torch
import yaml
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from harness import bench
from harness.config import load_run_config
from harness.model import accounting, cpu_kernels, gemm
from harness.model.ghc import GeneralizedHyperConnection
from harness.model.moe import expert_matmul

# VWNModule.training_step logs through self.log, which has nowhere to log outside a Trainer
pytestmark = pytest.mark.filterwarnings("ignore:.*`self.trainer` reference is not registered")


def test_widths_put_the_plain_transformer_first_and_skip_fractional_slots():
    assert bench.widths([1.0, 1.5, 2.0], [1, 2]) == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert bench.widths([4.0], [8]) == [(1, 1), (8, 32)]


def test_paired_overheads_cancel_a_machine_that_slows_down(monkeypatch):
    """Steps of 100, 120 and 150 time units on a machine 1 % slower at every step: each pair's ratio stays at
    the true overhead, where the ratio of medians, the later widths timed in a slower machine, does not."""
    clock = {"now": 0.0, "calls": 0}

    def step_of(units: float):
        def step() -> None:
            clock["now"] += units * (1 + 0.01 * clock["calls"])
            clock["calls"] += 1
        return step

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    times = bench.time_paired([step_of(100), step_of(120), step_of(150)], rounds=2, pairs_per_round=3)

    assert [len(s) for s in times.seconds] == [12, 6, 6] and [len(r) for r in times.ratios] == [1, 6, 6]
    assert times.overhead(0) == 0.0
    # off by at most the one step's drift between the two steps of a pair (1.2 · 1.01 = 1.212, 1.5 · 1.01 = 1.515)
    assert 0.20 < times.overhead(1) < 0.212 and 0.50 < times.overhead(2) < 0.515
    low, high = times.overhead_quartiles(2)
    assert 0.50 < low <= times.overhead(2) <= high < 0.515
    naive = times.median_seconds(2) / times.median_seconds(0) - 1
    assert naive > 0.55


def test_tiny_is_the_quickstart_base_and_small_is_larger():
    tiny, small = bench.reference_config("tiny"), bench.reference_config("small")
    assert tiny.model.virtual_width == (1, 1)
    assert small.model.d_model > tiny.model.d_model and small.model.n_layers > tiny.model.n_layers


def test_breakdown_sends_backward_time_to_the_forward_component():
    config = bench.with_width(bench.reference_config("tiny"), (2, 4))
    step = bench.TrainingStep(config)
    step()  # one-time costs (allocations, loading the GHC kernels) out of the profiled step
    with bench.labelled_forward(step.module.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    connections = [m for m in step.module.model.modules() if isinstance(m, GeneralizedHyperConnection)]
    assert connections and not any(set(bench.GHC_METHODS) & set(vars(c)) for c in connections)  # methods restored
    fractions = bench.breakdown_fractions(prof.events())
    assert sum(fractions.values()) == pytest.approx(1.0)
    for component in ("attention", "moe", "ghc", "embed_head", "mtp", "optimizer"):
        assert fractions[component] > 0.005, component
    assert fractions["other"] < 0.05
    # forward alone would leave backward nodes unmatched in "other"; backward is about 2/3 of the work
    assert fractions["attention"] + fractions["moe"] + fractions["ghc"] > 0.1


def test_matmul_recorder_counts_each_kernel_call_with_its_shapes_and_flops():
    a, b, x, w = torch.randn(8, 16), torch.randn(16, 4), torch.randn(3, 8, 16), torch.randn(3, 16, 5)
    weight = torch.randn(6, 16, requires_grad=True)
    with bench.MatmulRecorder() as recorder:
        torch.mm(a, b)
        torch.mm(a, b)
        torch.nn.functional.linear(a, weight, torch.randn(6)).sum().backward()  # addmm, and mm for its grad
        torch.bmm(x, w)
        a.relu()
    weight_t = bench.Layout((16, 6), (1, 16))  # linear's transposed weight, recorded with its strides
    ones = bench.Layout((6, 8), (0, 0))  # the gradient of .sum(), broadcast
    assert recorder.calls == {
        ("aten::mm", ((8, 16), (16, 4))): 2, ("aten::addmm", ((6,), (8, 16), weight_t)): 1,
        ("aten::mm", (ones, (8, 16))): 1, ("aten::bmm", ((3, 8, 16), (3, 16, 5))): 1,
    }
    flops = {call: bench.matmul_flops(call) for call in recorder.calls}
    assert flops[("aten::bmm", ((3, 8, 16), (3, 16, 5)))] == 2 * 3 * 8 * 16 * 5
    assert flops[("aten::addmm", ((6,), (8, 16), weight_t))] == 2 * 8 * 16 * 6
    assert bench.replayed(weight_t).stride() == (1, 16)
    assert bench.matmul_seconds(recorder.calls, repeats=1) > 0


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
def test_the_cross_entropy_ops_gemms_are_the_ones_the_recorder_counts(onednn):
    """The fused cross-entropy's GEMMs run inside its C++ op, unseen by dispatch: `cross_entropy_matmuls` lists them
    from its shapes. The profiler sees the calls themselves; both must agree (kernel, shapes, count)."""
    assert cpu_kernels.available()
    hidden, weight, targets = torch.randn(300, 16), torch.randn(40, 16), torch.randint(0, 40, (300,))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.ops.vwn_ce.linear_cross_entropy(hidden, weight, targets, 128, True, onednn)  # 128 + 128 + 44 rows
    made = sorted((e.name, tuple(tuple(shape) for shape in e.input_shapes[: bench.MATMULS[e.name].arguments]))
                  for e in prof.events() if e.name in bench.MATMULS)
    listed = sorted((name, tuple(op.shape if isinstance(op, bench.Layout) else op for op in operands))
                    for name, operands in bench.cross_entropy_matmuls(hidden, weight, targets, 128, True, onednn))
    assert made == listed and len(made) == 9
    flops = sum(bench.matmul_flops(call) for call in bench.cross_entropy_matmuls(hidden, weight, targets, 128, True,
                                                                                 onednn))
    assert flops == 3 * 2 * 300 * 16 * 40


@pytest.mark.parametrize("grouped_mm, names", [
    (lambda x, w, ends: torch.nn.functional.grouped_mm(x, w, offs=ends), ("aten::_grouped_mm",) * 3),  # eager
    (expert_matmul, ("vwn::expert_matmul", "vwn::expert_matmul", "vwn::expert_weight_grad")),  # compiled
], ids=["torch", "custom op"])
def test_matmul_recorder_counts_the_moe_grouped_products_with_their_group_ends(grouped_mm, names):
    x, w = torch.randn(10, 8, requires_grad=True), torch.randn(3, 8, 12, requires_grad=True)
    ends = torch.tensor([3, 3, 10], dtype=torch.int32)
    with bench.MatmulRecorder() as recorder:
        grouped_mm(x, w, ends).backward(torch.randn(10, 12))
    w_t = bench.Layout((3, 12, 8), (96, 1, 12))
    assert recorder.calls == {
        (names[0], ((10, 8), (3, 8, 12), (3, 3, 10))): 1,  # forward
        (names[1], ((10, 12), w_t, (3, 3, 10))): 1,  # input gradient
        (names[2], (bench.Layout((8, 10), (1, 8)), (10, 12), (3, 3, 10)) if names[2] == "aten::_grouped_mm"
         else ((10, 8), (10, 12), (3, 3, 10))): 1,  # weight gradient: xᵀ grad per group
    }
    assert {bench.matmul_flops(call) for call in recorder.calls} == {2 * 10 * 8 * 12}
    assert all(isinstance(call[1][2], bench.Offsets) for call in recorder.calls)
    assert bench.matmul_seconds(recorder.calls, repeats=1) > 0


def test_bench_main_writes_json_and_csv_with_one_row_per_width(tmp_path, monkeypatch, capsys):
    run_config = {
        "model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 16,
                  "n_experts": 4, "top_k": 2, "d_ff": 32, "mtp": True},
        "train": {"batch_size": 2},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(run_config))
    # before and after the timed steps, by library; the 4096² matmul is slow for a unit test
    rates = iter([{"mkl": 1e10, "onednn": 0.5e10}, {"mkl": 0.8e10, "onednn": 2e10}])
    monkeypatch.setattr(bench, "matmul_flops_per_s", lambda: next(rates))
    out = tmp_path / "out"
    assert bench.bench_main(["--config", str(path), "--m", "2", "--r", "1", "1.5", "4",
                             "--rounds", "1", "--steps", "2", "--default-malloc", "--out", str(out)]) == 0

    result = json.loads((out / "bench.json").read_text())
    assert result["matmul_flops_per_s"] == 2e10  # the fastest library at its faster measurement
    assert result["matmul_flops_per_s_by_library"] == {"mkl": 1e10, "onednn": 2e10}
    assert result["cpu_gemm"] == gemm.backend()
    runs = result["runs"]
    assert [(r["m"], r["n"], r["r"]) for r in runs] == [(1, 1, 1.0), (2, 3, 1.5), (2, 8, 4.0)]
    for run in runs:
        assert run["config"] == str(path)
        assert run["tokens_per_s"] > 0 and run["peak_mem_bytes"] > 0 and run["mfu"] > 0
        assert run["mfu_ceiling"] > run["mfu"] and 0 < run["matmul_ms"] < run["step_ms"]
        # every matmul of the step is recorded: all of 3 × the forward FLOPs but attention's SDPA kernel, the
        # GHC products, which the fused GHC kernels compute (2 per layer, MTP's layer included), and the MTP merge
        fused = 0
        if run["n"] > 1:
            fused = (2 * 2 * accounting.ghc_flops_per_token(32, run["m"], run["n"])
                     + accounting.mtp_merge_flops_per_token(32 // run["m"], run["n"]))
        matmul_flops = 3 * (run["flops_per_token"] - fused) * 2 * 16
        assert 1e9 * run["matmul_gflop"] == pytest.approx(matmul_flops, rel=0.1)
        # the ceiling counts the FLOPs of those calls only, at their standalone time
        assert run["mfu_ceiling"] == pytest.approx(matmul_flops / (run["matmul_ms"] / 1e3) / 2e10)  # the faster rate
        assert run["mfu"] == pytest.approx(3 * run["flops_per_token"] * run["tokens_per_s"] / 2e10)
        assert sum(run["breakdown_ms"].values()) == pytest.approx(run["step_ms"])
    assert runs[0]["overhead_measured"] == runs[0]["overhead_predicted"] == runs[0]["overhead_matmul_floor"] == 0.0
    for run in runs[1:]:  # one round of two (r = 1 step, width's step) pairs
        low, high = run["overhead_measured_quartiles"]
        assert run["timed_pairs"] == 2 and low <= run["overhead_measured"] <= high
        # two pairs reach no 95 % interval: the two ratios themselves
        assert run["overhead_measured_interval"][0] <= low and high <= run["overhead_measured_interval"][1]
    targets = result["targets"][str(path)]
    assert targets["r1_mfu"]["value"] == runs[0]["mfu"]
    assert [(w["m"], w["n"], w["measured"]) for w in targets["widths"]] == [
        (r["m"], r["n"], r["overhead_measured"]) for r in runs[1:]]
    assert {w["verdict"] for w in targets["widths"]} <= {"met", "missed", "undecided"}
    for run in runs[1:]:  # the width's extra calls (reduce head, MTP merge); the floor: their time over r = 1's step
        assert run["matmul_gflop"] > runs[0]["matmul_gflop"]  # (that time, microseconds here, is within the noise)
        assert run["overhead_matmul_floor"] == pytest.approx(
            (run["matmul_ms"] - runs[0]["matmul_ms"]) / runs[0]["step_ms"])
    assert runs[2]["overhead_predicted"] > runs[1]["overhead_predicted"] > 0
    moe = result["moe_vs_dense"][str(path)]
    low, high = moe["ratio_quartiles"]
    assert 0 < low <= moe["ratio"] <= high and moe["moe_ms"] > 0 and moe["dense_ms"] > 0
    low, high = moe["ratio_interval"]  # 30 pairs: x(10)..x(21)
    assert low <= moe["ratio"] <= high and targets["moe"]["interval"] == [low, high]

    with (out / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[1]["tokens_per_s"]) == pytest.approx(runs[1]["tokens_per_s"])
    printed = capsys.readouterr().out
    assert "| (2, 8) | 4 |" in printed and f"{path} (2, 8): overhead" in printed


def test_retain_freed_memory_applies_on_glibc():
    # in a child process: the setting is process-wide and cannot be undone
    code = "from harness.memory import retain_freed_memory; assert retain_freed_memory()"
    subprocess.run([sys.executable, "-c", code], check=platform.libc_ver()[0] == "glibc")


def test_matmul_rates_are_plausible_flop_rates_on_both_libraries():
    torch.manual_seed(0)
    rates = bench.matmul_flops_per_s(size=256, repeats=3)
    assert set(rates) == {"mkl", "onednn"} and all(1e8 < rate < 1e14 for rate in rates.values())


def test_compiled_step_matches_eager():
    config = load_run_config(None, [
        "model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
        "model.d_ff=32", "model.virtual_width=[2,4]", "model.mtp=true", "train.batch_size=2"])
    eager, compiled = bench.TrainingStep(config), bench.TrainingStep(config, compile=True)
    assert list(compiled.module.state_dict()) == list(eager.module.state_dict())  # checkpoints stay compatible
    eager(), compiled()
    for (name, a), b in zip(eager.module.named_parameters(), compiled.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_the_compiled_model_breaks_only_at_its_losses_and_runs_the_fused_kernels():
    """torch.compile holds the fused CPU kernels as opaque ops: the graph breaks only where the chunked losses run
    eager (`linear_cross_entropy` is compiler-disabled), and the compiled step calls the kernels eager calls."""
    config = load_run_config(None, [
        "model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
        "model.d_ff=32", "model.virtual_width=[2,4]", "model.mtp=true", "train.batch_size=2"])
    torch._dynamo.reset()
    counters.clear()
    step = bench.TrainingStep(config, compile=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    breaks = list(counters["graph_break"])
    assert breaks and all("linear_cross_entropy" in reason for reason in breaks), breaks
    kernels = {"vwn_ghc::write_read_forward", "vwn_ghc::write_read_backward", "vwn_ghc::mtp_merge_forward",
               "vwn_attn::attention_forward", "vwn_moe::route", "vwn_norm::rms_norm_forward"}
    if gemm.use_onednn():
        kernels.add("vwn::onednn_linear")
    if gemm.has_avx2():
        kernels |= {"vwn_swiglu::swiglu_forward", "vwn_swiglu::swiglu_backward", "vwn_gemm::weight_grad"}
    assert kernels <= {event.name for event in prof.events()}


def test_profiled_steps_leave_stderr_clean_and_restore_it(capfd):
    config = bench.with_width(bench.reference_config("tiny"), (2, 4))
    config = bench.dataclasses.replace(config, train=bench.dataclasses.replace(config.train, batch_size=1))
    bench.profile_step(bench.TrainingStep(config), breakdown=False, attempts=1)
    assert "profiler_start" not in capfd.readouterr().err  # kineto's C++ lines were discarded
    print("after", file=sys.stderr, flush=True)
    assert capfd.readouterr().err == "after\n"  # and file descriptor 2 works again


def test_with_mfu_puts_each_ratio_after_its_rate():
    run = {"step_ms": 10.0, "model_flops_per_s": 4e9, "matmul_call_flops_per_s": 8e9, "peak_mem_bytes": 1}
    out = bench.with_mfu(run, 2e10)
    assert list(out) == ["step_ms", "model_flops_per_s", "mfu", "matmul_call_flops_per_s", "mfu_ceiling",
                         "peak_mem_bytes"]
    assert out["mfu"] == pytest.approx(0.2) and out["mfu_ceiling"] == pytest.approx(0.4)
