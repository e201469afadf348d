"""`vwn bench`: what virtual width costs on this machine, measured against what its FLOPs predict.

For each config and virtual width (m, n) it times the training step exactly as `VWNModule` trains
(forward, losses, backward, gradient clipping, AdamW, learning-rate schedule) and reports:

    tokens_per_s         tokens / median step time, after warm-up
    mfu                  3 · forward FLOPs per token (`accounting`) · tokens_per_s / matmul rate,
                         the matmul rate being a large fp32 product measured in the same process,
                         before and after the timed steps, on torch's `torch.mm` (MKL) and on oneDNN
                         (`gemm`): the fastest of those (where MKL runs its AVX2 code, torch.mm alone
                         would understate the machine by half)
    overhead_measured    median of step time / step time at r = 1 - 1 (0.20 = +20 %), each ratio of two steps
                         run back to back (`time_paired`); with the ratios' quartiles and the median's 95 %
                         confidence interval (`overhead_measured_interval`)
    overhead_predicted   FLOPs per token / FLOPs per token at r = 1 - 1
    mfu_ceiling          the MFU the step would reach if it did nothing but its dense matmul calls
                         (mm, bmm, addmm, baddbmm, oneDNN's products, the fused weight gradients and the MoE's
                         grouped products, recorded with shapes in one step; the products inside the fused
                         cross-entropy and SwiGLU ops as the library calls they replace), each as fast as it runs
                         alone with warm caches (`matmul_ms`),
                         counting only the FLOPs those calls do (not the GHC products of the fused GHC
                         kernels): an upper bound for the matmul part of the step on this machine
    overhead_matmul_floor  (matmul_ms - matmul_ms at r = 1) / step time at r = 1: the overhead that the
                         width's extra matmul calls alone add (with the fused GHC kernels: the wider
                         embedding, reduce head and MTP merge)
    peak_mem_bytes       parameters + optimizer state + the step's peak of live tensors
    breakdown            where the step's time goes, from one profiled step, in ms of the median
                         step: attention and moe (each with its pre-norm), ghc (the GHCs' reads and
                         writes, or the residual adds at r = 1; and the state's conversions to and
                         from the kernels' lane tiles), embed_head (embedding, reduce
                         head, LM head calls, losses), mtp (the MTP module, its LM head call
                         excepted), optimizer (clipping, AdamW, schedule), other (unattributed)

`targets` in bench.json, printed after the table, checks each config against the performance targets
(`bench_targets`): r = 1 MFU, each width's overhead against 1.3 × predicted + 3 points, the MoE check.

r = 1 is always the plain transformer (m = n = 1), the reference of the overheads. Each width is timed in
pairs with it (an r = 1 step, then the width's), a few pairs in turn per width and round, so a change of
machine load shifts both steps of a pair alike instead of biasing the overheads. A MoE check times one
MoE layer against a dense SwiGLU of equal active FLOPs (hidden width top_k · d_ff), forward + backward.

    vwn bench --quick                    # tiny reference config only, CI smoke test (< 2 min)
    vwn bench --m 2 8 --out bench/       # tiny and small configs, r in {1, 1.5, 2, 4, 8} at m = 2 and 8
    vwn bench --quick --compile          # the same with LanguageModel.compile() (first step: compilation)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from harness.bench_targets import check_targets, format_targets, median_interval
from harness.config import RunConfig, load_run_config
from harness.grid import load_grid
from harness.lit import VWNModule
from harness.memory import release_freed_memory, retain_freed_memory
from harness.model import accounting, cpu_kernels, gemm
from harness.model.ghc import GeneralizedHyperConnection
from harness.model.moe import MixtureOfExperts, SwiGLU, expert_matmul, expert_weight_grad
from harness.model.transformer import Attention, MultiTokenPredictor, ReduceHead, WideEmbedding

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
WIDTH_FACTORS = (1.0, 1.5, 2.0, 4.0, 8.0)
COMPONENTS = ("attention", "moe", "ghc", "embed_head", "mtp", "optimizer", "other")
BACKWARD_NODE = "autograd::engine::evaluate_function"
TILE_CONVERSIONS = ("vwn_ghc::tile", "vwn_ghc::untile")  # the state to and from lane tiles (ghc_kernel)
GHC_METHODS = ("read", "write", "write_then_read")  # called between the sublayers, not through forward

# training_step logs through self.log, which has nothing to log to outside a Trainer
warnings.filterwarnings("ignore", message=".*`self.trainer` reference is not registered.*")


def reference_config(name: str) -> RunConfig:
    """`tiny`: the base of the quickstart grid; `small`: a wider, deeper, longer-context variant of it;
    anything else: a run-config YAML (as for `vwn train`)."""
    if name not in ("tiny", "small"):
        return load_run_config(name)
    tiny = load_grid(QUICKSTART).runs[0].config
    if name == "tiny":
        return tiny
    model = dataclasses.replace(tiny.model, d_model=256, n_layers=6, n_heads=8, n_experts=8, top_k=2,
                                d_ff=512, seq_len=256)
    return dataclasses.replace(tiny, model=model)


def widths(factors: list[float], ms: list[int]) -> list[tuple[int, int]]:
    """(m, n) pairs for virtual width factors r = n/m at each m where r·m is whole. The first is always
    (1, 1), the plain transformer that overheads are measured against."""
    pairs = [(1, 1)]
    for m in ms:
        pairs += [(m, int(r * m)) for r in factors if r != 1.0 and (r * m).is_integer()]
    return list(dict.fromkeys(pairs))


def with_width(config: RunConfig, width: tuple[int, int]) -> RunConfig:
    return dataclasses.replace(config, model=dataclasses.replace(config.model, virtual_width=width))


def call_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(call_seconds(fn, repeats))


def matmul_flops_per_s(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Dense fp32 matmul rates of this process, a (size × size) @ (size × size) product: on torch.mm (MKL) and,
    where torch has it, on oneDNN."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = {"mkl": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        products["onednn"] = lambda: gemm.onednn_linear(a, b)
    rates = {}
    for name, product in products.items():
        product()  # warm-up: thread pool, buffers, oneDNN's kernel for the shape
        rates[name] = 2 * size**3 / median_seconds(product, repeats)
    return rates


class TrainingStep:
    """One optimizer step of `VWNModule` on a fixed random window, as Lightning runs it."""

    def __init__(self, config: RunConfig, compile: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.config = config
        self.module = VWNModule.from_run_config(config)
        self.module.train()
        if compile:
            self.module.model.compile(dynamic=False)
        optimizers = self.module.configure_optimizers()
        self.optimizer, self.schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
        model = config.model
        self.window = torch.randint(0, model.vocab_size, (config.train.batch_size, model.seq_len + 2))

    @property
    def tokens(self) -> int:
        return self.window.shape[0] * self.config.model.seq_len

    def __call__(self) -> None:
        with record_function("embed_head"):  # the losses outside the model's modules
            loss = self.module.training_step(self.window, 0)
        loss.backward()
        with record_function("optimizer"):
            if self.config.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.config.optim.grad_clip)
            self.module.on_before_optimizer_step(self.optimizer)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()

    def state_bytes(self) -> int:
        """Parameters, buffers and optimizer state: the memory held between steps."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def component_of(module: nn.Module, name: str) -> str | None:
    """Breakdown label of a module whose forward opens a profiler range (innermost wins, except mtp)."""
    if isinstance(module, MultiTokenPredictor):
        return "mtp"
    if isinstance(module, Attention) or name.endswith("attn_norm"):
        return "attention"
    if isinstance(module, MixtureOfExperts | SwiGLU) or name.endswith("ffn_norm"):
        return "moe"
    if isinstance(module, WideEmbedding | ReduceHead) or name.endswith("lm_head"):
        return "embed_head"
    return None


def in_range(label: str, method: Callable) -> Callable:
    """`method`, each call inside a profiler range named `label`."""
    def call(*args, **kwargs):
        with record_function(label):
            return method(*args, **kwargs)
    return call


@contextlib.contextmanager
def labelled_forward(model: nn.Module) -> Iterator[None]:
    """Open a profiler range named by `component_of` around each labelled module's forward, and a "ghc" range around
    each call of a GHC's read and write (which `ghc.run_stack` calls directly, between the sublayers)."""
    open_ranges: list[record_function] = []

    def enter(label: str) -> Callable:
        def hook(*_) -> None:
            open_ranges.append(record_function(label))
            open_ranges[-1].__enter__()
        return hook

    def leave(*_) -> None:
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    connections = [module for module in model.modules() if isinstance(module, GeneralizedHyperConnection)]
    for name, module in model.named_modules():
        if (label := component_of(module, name)) is not None:
            handles += [module.register_forward_pre_hook(enter(label)), module.register_forward_hook(leave)]
    for connection in connections:
        for method in GHC_METHODS:
            setattr(connection, method, in_range("ghc", getattr(connection, method)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for connection in connections:
            for method in GHC_METHODS:
                delattr(connection, method)  # the class's method again


def ancestry(event) -> list[str]:
    """Names of a profiler event and its enclosing events, innermost first."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def label_of(names: list[str]) -> str:
    """Component of a forward event: mtp if inside the MTP module, ghc if inside a conversion of the state to or
    from lane tiles (made between the blocks), else its innermost labelled range."""
    labels = [name for name in names if name in COMPONENTS]
    if "mtp" in labels:
        return "mtp"
    if any(name in TILE_CONVERSIONS for name in names):
        return "ghc"
    return labels[0] if labels else "other"


def breakdown_fractions(events) -> dict[str, float]:
    """Share of the profiled step per component.

    Forward and optimizer time (self time of each op) goes to the innermost labelled range around
    it; each backward node (autograd::engine::evaluate_function) goes to the component of the
    forward op that recorded it, matched through the autograd sequence number."""
    seconds = dict.fromkeys(COMPONENTS, 0.0)
    forward_label, backward = {}, []
    for event in events:
        names = ancestry(event)
        if event.name.startswith(BACKWARD_NODE):
            backward.append(event)
        elif not any(name.startswith(BACKWARD_NODE) for name in names):
            seconds[label_of(names)] += event.self_cpu_time_total
            if event.sequence_nr >= 0:
                forward_label[event.sequence_nr] = label_of(names)
    for event in backward:
        seconds[forward_label.get(event.sequence_nr, "other")] += event.cpu_time_total
    total = sum(seconds.values())
    return {k: v / total for k, v in seconds.items()}


def peak_allocated(prof: profile) -> int:
    """Peak of live tensor bytes allocated inside the profiled region.

    NOTE: CPU tensors have no allocator statistics (no CPU twin of torch.cuda.max_memory_allocated);
    the profiler's allocation events carry the running total of bytes allocated while profiling."""
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == torch._C._profiler._EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


@dataclasses.dataclass(frozen=True)
class Matmul:
    """A dense matmul kernel: how to call it, how many leading arguments describe a call, where
    its two factors sit among them (addmm/baddbmm: after the added tensor), and whether it multiplies by the
    second one's transpose."""

    kernel: Callable[..., torch.Tensor]
    arguments: int
    factors: slice
    transposed: bool = False


MATMULS: dict[str, Matmul] = {
    "aten::mm": Matmul(torch.mm, 2, slice(0, 2)), "aten::bmm": Matmul(torch.bmm, 2, slice(0, 2)),
    "aten::addmm": Matmul(torch.addmm, 3, slice(1, 3)), "aten::addmm_": Matmul(torch.addmm, 3, slice(1, 3)),
    "aten::baddbmm": Matmul(torch.baddbmm, 3, slice(1, 3)),
    # a · bᵀ, b (N, K): the products `gemm` puts on oneDNN (linears, experts, the fused cross-entropy's)
    "mkldnn::_linear_pointwise": Matmul(gemm.onednn_linear, 2, slice(0, 2), transposed=True),
    # aᵀ b, a (K, M): the weight gradients of those linears and experts (`gemm.weight_grad`'s fused kernel)
    "vwn_gemm::weight_grad": Matmul(gemm.weight_grad, 2, slice(0, 2)),
    # the MoE's grouped products (x, w or grad, group ends): the group ends are recorded by value;
    # torch's kernel in eager, the custom ops when compiled
    "aten::_grouped_mm": Matmul(torch._grouped_mm, 3, slice(0, 2)),
    "vwn::expert_matmul": Matmul(expert_matmul, 3, slice(0, 2)),
    "vwn::expert_weight_grad": Matmul(expert_weight_grad, 3, slice(0, 2)),
}


class Offsets(tuple):
    """An integer operand recorded by its values (the group ends of a grouped product), not its shape."""


class Layout(typing.NamedTuple):
    """A non-contiguous operand (a transposed weight, a chunk of a wider tensor): shape and strides."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]


Operand = tuple[int, ...] | Offsets | Layout  # a contiguous operand is recorded by its shape
MatmulCall = tuple[str, tuple[Operand, ...]]  # kernel name, operands


def recorded(operand: torch.Tensor) -> Operand:
    if not operand.is_floating_point():
        return Offsets(operand.tolist())
    if operand.is_contiguous():
        return tuple(operand.shape)
    return Layout(tuple(operand.shape), operand.stride())


def replayed(operand: Operand) -> torch.Tensor:
    """A random tensor laid out as the recorded one (kernels' speed, and some kernels' support, depend on it)."""
    if isinstance(operand, Offsets):
        return torch.tensor(operand, dtype=torch.int32)
    if isinstance(operand, Layout):
        extent = 1 + sum((size - 1) * stride for size, stride in zip(operand.shape, operand.stride, strict=True))
        return torch.randn(extent).as_strided(operand.shape, operand.stride)
    return torch.randn(operand)


class MatmulRecorder(TorchDispatchMode):
    """Counts every dense matmul kernel call run under it, forward and backward, by (kernel, operand
    shapes). Dispatch sees ops after decomposition, so F.linear shows up as the mm or addmm it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[MatmulCall] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in MATMULS:
            self.calls[name, tuple(recorded(a) for a in args[: MATMULS[name].arguments])] += 1
        elif name == "vwn_ce::linear_cross_entropy":  # its GEMMs run inside the C++ op, unseen by dispatch
            self.calls.update(cross_entropy_matmuls(*args))
        elif name in ("vwn_swiglu::swiglu_forward", "vwn_swiglu::swiglu_backward"):  # so do these
            self.calls.update(swiglu_matmuls(*args[-3:], backward=name.endswith("backward")))
        return func(*args, **(kwargs or {}))


def cross_entropy_matmuls(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                          with_grads: bool, onednn: bool) -> list[MatmulCall]:
    """The GEMMs the fused cross-entropy op (csrc/cross_entropy.cpp) makes, as dispatch would record them: per
    chunk of rows h (c, D), the logits h Wᵀ, and with gradients the chunk's G W and hᵀ G (Wᵀ's gradient,
    accumulated: by addmm_ on MKL, a product and an add on oneDNN)."""
    vocab, width = weight.shape
    calls = []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = min(chunk_rows, hidden.shape[0] - start)
        if onednn:
            calls.append(("mkldnn::_linear_pointwise", ((rows, width), (vocab, width))))
            if with_grads:
                calls.append(("mkldnn::_linear_pointwise", ((rows, vocab), Layout((width, vocab), (1, width)))))
                calls.append(("mkldnn::_linear_pointwise", (Layout((width, rows), (1, width)),
                                                            Layout((vocab, rows), (1, vocab)))))
            continue
        calls.append(("aten::mm", ((rows, width), Layout((width, vocab), (1, width)))))
        if with_grads:
            calls.append(("aten::mm", ((rows, vocab), (vocab, width))))
            calls.append(("aten::addmm_", ((width, vocab), Layout((width, rows), (1, width)), (rows, vocab))))
    return calls


def swiglu_matmuls(w_in: torch.Tensor, w_out: torch.Tensor, ends: torch.Tensor, backward: bool) -> list[MatmulCall]:
    """The products of the fused SwiGLU experts op (csrc/swiglu.cpp), as the library products and weight gradients
    the unfused experts would call: per expert of r rows, forward x W_in and h W_out; backward dy W_outᵀ, d pre
    W_inᵀ, and the weight gradients hᵀ dy and xᵀ d pre."""
    _, width, double_hidden = w_in.shape
    hidden = double_hidden // 2
    onednn = gemm.use_onednn()

    def product(rows: int, depth: int, columns: int) -> MatmulCall:
        if onednn:
            return "mkldnn::_linear_pointwise", ((rows, depth), (columns, depth))
        return "aten::mm", ((rows, depth), (depth, columns))

    calls = []
    bounds = ends.tolist()
    for rows in (end - start for start, end in zip([0, *bounds[:-1]], bounds, strict=True)):
        if rows == 0:
            continue
        if not backward:
            calls += [product(rows, width, double_hidden), product(rows, hidden, width)]
            continue
        calls += [product(rows, width, hidden), product(rows, double_hidden, width),
                  ("vwn_gemm::weight_grad", ((rows, hidden), (rows, width))),
                  ("vwn_gemm::weight_grad", ((rows, width), (rows, double_hidden)))]
    return calls


def matmul_flops(call: MatmulCall) -> int:
    """2·M·K·N, times the batch for bmm/baddbmm (for the grouped products: summed over the groups)."""
    matmul = MATMULS[call[0]]
    a, b = (operand.shape if isinstance(operand, Layout) else operand for operand in call[1][matmul.factors])
    return 2 * math.prod(a) * (b[-2] if matmul.transposed else b[-1])


def matmul_seconds(calls: collections.Counter[MatmulCall], repeats: int = 5) -> float:
    """Time the calls would take alone: each distinct call timed standalone × its count, at the fastest of
    `repeats` runs with warm caches (the kernel's own speed: other load on the machine only slows a run)."""
    total = 0.0
    for call, count in calls.items():
        kernel = MATMULS[call[0]].kernel
        operands = [replayed(operand) for operand in call[1]]
        kernel(*operands)
        total += count * min(call_seconds(lambda kernel=kernel, operands=operands: kernel(*operands), repeats))
    return total


@contextlib.contextmanager
def profiler_output_silenced() -> Iterator[None]:
    """Discard what is written to the process's stderr (file descriptor 2) meanwhile.

    NOTE: torch 2.13's profiler (kineto) prints "USDT ... profiler_start/profiler_stop" lines from C++
    at every start and stop, whatever KINETO_LOG_LEVEL says; the benchmark profiles dozens of steps."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(step: TrainingStep, breakdown: bool, attempts: int = 2
                 ) -> tuple[dict[str, float] | None, int, collections.Counter[MatmulCall]]:
    """Profile steps: breakdown fractions (if asked), peak memory in bytes, and the step's matmul calls.

    The breakdown comes from the fastest of `attempts` profiled steps: a single step can be an outlier
    (machine load, the heap growing), and its shares would then misstate the median step.
    NOTE: no breakdown for a compiled model: its fused kernels no longer map to modules, and the
    labelling hooks would make it recompile."""
    fastest, fractions, peak = float("inf"), None, 0
    for _ in range(attempts):
        labels = labelled_forward(step.module.model) if breakdown else contextlib.nullcontext()
        started = time.perf_counter()
        with labels, profiler_output_silenced(), \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        seconds = time.perf_counter() - started
        peak = max(peak, peak_allocated(prof))
        if breakdown and seconds < fastest:
            fastest, fractions = seconds, breakdown_fractions(prof.events())
    # NOTE: not from the profiler: recording shapes while profiling memory grew the heap to 24 GB over
    # the small config's widths (its records fragment the heap between tensor blocks)
    with MatmulRecorder() as recorder:
        step()
    return fractions, step.state_bytes() + peak, recorder.calls


@dataclasses.dataclass
class PairedTimes:
    """Step seconds of each width, and each width's step-time ratios to the r = 1 step timed next to it."""

    seconds: list[list[float]]  # per step function
    ratios: list[list[float]]  # per step function; [1.0] for the reference itself

    def median_seconds(self, i: int) -> float:
        return statistics.median(self.seconds[i])

    def overhead(self, i: int) -> float:
        """The median of step i's paired ratios, minus one (0.20 = +20 %)."""
        return statistics.median(self.ratios[i]) - 1

    def overhead_quartiles(self, i: int) -> list[float]:
        ratios = self.ratios[i] * 2 if len(self.ratios[i]) == 1 else self.ratios[i]  # quantiles() wants two
        first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
        return [first - 1, third - 1]

    def overhead_interval(self, i: int) -> list[float]:
        """The 95 % confidence interval of `overhead(i)` from its pairs (`bench_targets.median_interval`)."""
        return [ratio - 1 for ratio in median_interval(self.ratios[i])]


def time_paired(steps: list[Callable[[], object]], rounds: int, pairs_per_round: int) -> PairedTimes:
    """Times every step function against the reference steps[0] (the widths against r = 1): in each of `rounds`
    rounds, each in turn runs `pairs_per_round` pairs of (reference step, its step) back to back.

    NOTE: a ratio of two adjacent steps cancels the machine's drift, which the ratio of two medians taken
    minutes apart does not: here one run's r = 1 step came out 14 % faster than the run before's while its
    wider steps came out 7-10 % slower."""
    seconds: list[list[float]] = [[] for _ in steps]
    ratios: list[list[float]] = [[1.0]] + [[] for _ in steps[1:]]

    def timed(i: int) -> float:
        started = time.perf_counter()
        steps[i]()
        seconds[i].append(time.perf_counter() - started)
        return seconds[i][-1]

    for _ in range(rounds):
        for i in range(1, len(steps)):
            steps[i]()  # re-warm its caches after the other widths ran
            for _ in range(pairs_per_round):
                reference = timed(0)
                ratios[i].append(timed(i) / reference)
    if len(steps) == 1:  # nothing to pair with
        for _ in range(rounds * pairs_per_round):
            timed(0)
    return PairedTimes(seconds, ratios)


def moe_vs_dense(config: RunConfig, repeats: int = 30) -> dict:
    """Forward + backward of one MoE layer vs a dense SwiGLU of hidden width top_k · d_ff (equal
    active FLOPs but for the router's 2·D·E), on the config's batch of tokens: the median time of each, and
    the median and quartiles of the ratio of a MoE call to the dense call just before it (`time_paired`)."""
    c = config.model
    torch.manual_seed(0)
    moe = MixtureOfExperts(c.d_model, c.d_ff, c.n_experts, c.top_k, c.n_shared_experts,
                           c.aux_free_balancing, c.bias_update_rate)
    dense = SwiGLU(c.d_model, (c.top_k + c.n_shared_experts) * c.d_ff)
    for p in [*moe.parameters(), *dense.parameters()]:
        nn.init.normal_(p, std=c.init_std)
    x = torch.randn(config.train.batch_size, c.seq_len, c.d_model, requires_grad=True)

    def run(layer: nn.Module) -> None:
        out, stats = layer(x)
        loss = out.square().mean()
        if stats is not None:
            loss = loss + stats.balance_loss + stats.z_loss
        loss.backward()

    run(dense)  # warm-up (time_paired warms the MoE)
    times = time_paired([lambda: run(dense), lambda: run(moe)], rounds=1, pairs_per_round=repeats)
    return {"moe_ms": 1e3 * times.median_seconds(1), "dense_ms": 1e3 * times.median_seconds(0),
            "ratio": 1 + times.overhead(1), "ratio_quartiles": [1 + q for q in times.overhead_quartiles(1)],
            "ratio_interval": [1 + q for q in times.overhead_interval(1)]}


def fused_ghc_flops_per_token(config: RunConfig) -> int:
    """Forward FLOPs per token that the fused GHC kernels compute (no matmul call does them): every GHC of
    the backbone and of the MTP layer, and the MTP module's merge into the state's lane tiles, when the
    kernels are there (the bench runs on CPU in fp32) and the state has more than one slot."""
    c = config.model
    if c.n == 1 or not cpu_kernels.available():
        return 0
    ghc = 2 * (c.n_layers + int(c.mtp)) * accounting.ghc_flops_per_token(c.d_model, c.m, c.n, c.dynamic)
    return ghc + (accounting.mtp_merge_flops_per_token(c.d_slot, c.n) if c.mtp else 0)


def bench_config(name: str, config: RunConfig, pairs: list[tuple[int, int]], rounds: int, per_round: int,
                 compile: bool) -> list[dict]:
    """Every width of one config: timing, model FLOP rates (MFU once divided by the machine's rate),
    overheads, peak memory and breakdown."""
    configs = [with_width(config, pair) for pair in pairs]
    steps = [TrainingStep(c, compile) for c in configs]
    first_step = [median_seconds(step, 1) for step in steps]  # allocations, optimizer state, compilation
    times = time_paired(steps, rounds, per_round)
    flops = [accounting.flops_per_token(c.model)["total"] for c in configs]
    fused = [fused_ghc_flops_per_token(c) for c in configs]
    base_flops = flops[0]
    runs = []
    for i, (c, step, first, f, f_fused) in enumerate(zip(configs, steps, first_step, flops, fused, strict=True)):
        s = times.median_seconds(i)
        fractions, peak, calls = profile_step(step, breakdown=not compile)
        matmul_s = matmul_seconds(calls)
        release_freed_memory()
        runs.append({
            "config": name,
            "m": c.model.m,
            "n": c.model.n,
            "r": c.model.r,
            "step_ms": 1e3 * s,
            "tokens_per_s": step.tokens / s,
            "flops_per_token": f,
            "model_flops_per_s": 3 * f * step.tokens / s,
            # the MFU if the step were nothing but its matmul calls, each as fast as it runs alone (counting only
            # the FLOPs those calls do: not the GHC products inside the fused kernels)
            "matmul_call_flops_per_s": 3 * (f - f_fused) * step.tokens / matmul_s,
            "matmul_ms": 1e3 * matmul_s,
            "matmul_gflop": sum(count * matmul_flops(call) for call, count in calls.items()) / 1e9,
            "overhead_measured": times.overhead(i),
            "overhead_measured_quartiles": times.overhead_quartiles(i),
            "overhead_measured_interval": times.overhead_interval(i),
            "timed_pairs": len(times.ratios[i]) if i else 0,
            "overhead_predicted": f / base_flops - 1,
            # what the width's extra matmul calls alone add to the r = 1 step, each at its standalone speed
            "overhead_matmul_floor": (1e3 * matmul_s - runs[0]["matmul_ms"]) / runs[0]["step_ms"] if runs else 0.0,
            "peak_mem_bytes": peak,
            "first_step_s": first,
            "breakdown_ms": {k: 1e3 * s * v for k, v in fractions.items()} if fractions else None,
        })
    return runs


def format_table(result: dict) -> str:
    """Markdown table of the runs, then the matmul rate and MoE checks."""
    head = ("| config | (m, n) | r | tokens/s | step ms | MFU | MFU ceiling | overhead meas. (quartiles) | "
            "overhead pred. | overhead matmul floor | peak MB | first step s | "
            + " | ".join(f"{k} ms" for k in COMPONENTS) + " |")
    lines = [head, "|" + "---|" * (12 + len(COMPONENTS))]
    for run in result["runs"]:
        parts = [run["config"], f"({run['m']}, {run['n']})", f"{run['r']:g}", f"{run['tokens_per_s']:,.0f}",
                 f"{run['step_ms']:.1f}", f"{run['mfu']:.1%}", f"{run['mfu_ceiling']:.1%}",
                 "{:+.1%} ({:+.1%}, {:+.1%})".format(run["overhead_measured"], *run["overhead_measured_quartiles"]),
                 f"{run['overhead_predicted']:+.1%}", f"{run['overhead_matmul_floor']:+.1%}",
                 f"{run['peak_mem_bytes'] / 2**20:,.0f}",
                 f"{run['first_step_s']:.1f}"]
        breakdown = run["breakdown_ms"] or {}
        parts += [f"{breakdown[k]:.1f}" if k in breakdown else "-" for k in COMPONENTS]
        lines.append("| " + " | ".join(parts) + " |")
    libraries = ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in result["matmul_flops_per_s_by_library"].items())
    lines.append(f"\nmatmul rate: {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (by library: {libraries}); "
                 f"cross-entropy GEMMs on {result['cpu_gemm']}; {result['threads']} threads, "
                 f"compile: {result['compile']}, retain_freed_memory: {result['retain_freed_memory']}")
    for name, check in result["moe_vs_dense"].items():
        lines.append(f"MoE check ({name}): MoE layer {check['moe_ms']:.2f} ms vs dense SwiGLU of equal active "
                     f"FLOPs {check['dense_ms']:.2f} ms: x{check['ratio']:.2f} (paired calls; quartiles "
                     "x{:.2f}, x{:.2f})".format(*check["ratio_quartiles"]))
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    columns = [k for k in result["runs"][0] if k != "breakdown_ms"] + [f"{k}_ms" for k in COMPONENTS]
    with (out / "bench.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for run in result["runs"]:
            row = {k: v for k, v in run.items() if k != "breakdown_ms"}
            writer.writerow(row | {f"{k}_ms": v for k, v in (run["breakdown_ms"] or {}).items()})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vwn bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["tiny", "small"], metavar="NAME_OR_YAML",
                   help="tiny (quickstart grid base), small, or run-config YAML files (default: tiny small)")
    p.add_argument("--m", nargs="+", type=int, default=[2], help="backbone splits m to pair with each r (default: 2)")
    p.add_argument("--r", nargs="+", type=float, default=list(WIDTH_FACTORS), help="virtual width factors n/m")
    p.add_argument("--quick", action="store_true", help="tiny config only, fewer timed steps (CI smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the widths (default: 3)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed pairs (r = 1 step, width's step) per width and round (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model in place (MoE layers stay eager); no time breakdown")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default malloc settings (skip retain_freed_memory)")
    p.add_argument("--out", default="bench", help="folder for bench.json and bench.csv (default: bench)")
    return p


def with_mfu(run: dict, matmul_rate: float) -> dict:
    """The run with `mfu` and `mfu_ceiling` (its FLOP rates over the machine's) after the rates they come from."""
    ratios = {"model_flops_per_s": "mfu", "matmul_call_flops_per_s": "mfu_ceiling"}
    out = {}
    for key, value in run.items():
        out[key] = value
        if key in ratios:
            out[ratios[key]] = value / matmul_rate
    return out


def bench_main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = not args.default_malloc and retain_freed_memory()
    names = ["tiny"] if args.quick else args.config
    rounds, per_round = (3, 3) if args.quick else (args.rounds, args.steps)
    pairs = widths(args.r, args.m)
    configs = {name: reference_config(name) for name in names}
    if args.compile:
        # NOTE: dynamo keeps its compiled variants per code object, which all the models of this process share
        # (each model's widths and shapes trace its modules' forwards anew); past its limit of 8 it warned and ran
        # the frame eager for the later widths
        models = len(configs) * len(pairs)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * models)
    rates = [matmul_flops_per_s()]
    result = {"threads": torch.get_num_threads(), "compile": args.compile, "retain_freed_memory": retained,
              "cpu_gemm": gemm.backend(), "runs": [], "moe_vs_dense": {}}
    for name, config in configs.items():
        result["runs"] += bench_config(name, config, pairs, rounds, per_round, args.compile)
        if config.model.n_experts > 0:
            result["moe_vs_dense"][name] = moe_vs_dense(config)
    # NOTE: the machine's rate is the faster of a measurement before and one after the timed steps: this
    # machine's speed drifts, and one measurement in a slow moment overstated every MFU by a quarter
    rates.append(matmul_flops_per_s())
    by_library = {name: max(r[name] for r in rates) for name in rates[0]}
    result["matmul_flops_per_s"] = max(by_library.values())
    result["matmul_flops_per_s_by_library"], result["matmul_flops_per_s_measured"] = by_library, rates
    result["runs"] = [with_mfu(run, result["matmul_flops_per_s"]) for run in result["runs"]]
    result["targets"] = check_targets(result)
    write_outputs(result, Path(args.out))
    print(format_table(result))
    print(format_targets(result["targets"]))
    print(f"\nwrote {Path(args.out) / 'bench.json'} and bench.csv")
    return 0
