"""kopt beside optax (and torch.optim) on optimizer steps: time, compile time, memory, bandwidth.

    python benchmarks/run.py            # full run: 16M leaf, GPT-2-small tree (124M), 2000 leaves
    python benchmarks/run.py --quick    # smaller trees, fewer optimizers on big shapes: < 5 min on 2 cores

Every configuration (shape x optimizer) is measured for kopt and its peers in the same process,
interleaved: each repetition runs every contestant once, starting from a rotating one, and the
medians are reported with kopt/peer ratios (< 1 means kopt is faster). Results go to stdout,
benchmarks/results/latest.{csv,md} and benchmarks/results/ratios.png. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import gc
import itertools
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo

try:
    import torch
except ImportError:  # torch is optional: its columns stay empty
    torch = None

jax.config.update("jax_enable_compilation_cache", False)  # every compile below is a real one

ON_GPU = jax.default_backend() == "gpu"
# torch.optim runs on the device JAX runs on: the same GPU, or the CPU.
TORCH_DEVICE = "cuda" if ON_GPU and torch is not None and torch.cuda.is_available() else "cpu"

RESULTS = Path(__file__).resolve().parent / "results"
NAN = float("nan")
EPS = 1e-7  # Keras 2's epsilon, given to the peers too
LOOP_STEPS = 20  # steps per jitted loop for the device time (GPU)
CLIPNORM = 1.0


# ----------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Spec:
    """One optimizer: kopt's factory, the closest optax configuration, and torch.optim's."""

    name: str
    kopt: Callable[[], Any]
    optax: Callable[[], optax.GradientTransformation]
    slots: int  # per-parameter state arrays
    torch: tuple[str, dict] | None = None  # (torch.optim class, kwargs)
    torch_fused: bool = False  # torch.optim has fused=True for it on CPU
    clipnorm: float | None = None  # torch needs the global-norm clip as a separate call

    @property
    def traffic(self) -> int:
        """Bytes per float32 parameter of minimal traffic: read params, grads and slots, write params
        and slots (4 * (3 + 2 * slots)); a global-norm clip adds one read of the grads."""
        return 4 * (3 + 2 * self.slots) + (4 if self.clipnorm else 0)


OPTIMIZERS = [
    Spec(
        "sgd_momentum",
        lambda: kopt.SGD(lr=0.01, momentum=0.9),
        lambda: optax.sgd(0.01, momentum=0.9),
        1,
        ("SGD", {"lr": 0.01, "momentum": 0.9}),
        torch_fused=True,
    ),
    Spec(
        "rmsprop",
        lambda: kopt.RMSprop(lr=1e-3),
        lambda: optax.rmsprop(1e-3, decay=0.9, eps=EPS),
        1,
        ("RMSprop", {"lr": 1e-3, "alpha": 0.9, "eps": EPS}),
    ),
    Spec(
        "adagrad",
        lambda: kopt.Adagrad(lr=0.01),
        lambda: optax.adagrad(0.01, initial_accumulator_value=0.0, eps=EPS),
        1,
        ("Adagrad", {"lr": 0.01, "eps": EPS}),
        torch_fused=True,
    ),
    Spec(
        "adadelta",
        lambda: kopt.Adadelta(lr=1.0),
        lambda: optax.adadelta(1.0, rho=0.95, eps=EPS),
        2,
        ("Adadelta", {"lr": 1.0, "rho": 0.95, "eps": EPS}),
    ),
    Spec(
        "adam",
        lambda: kopt.Adam(lr=1e-3),
        lambda: optax.adam(1e-3, eps=EPS),
        2,
        ("Adam", {"lr": 1e-3, "eps": EPS}),
        torch_fused=True,
    ),
    Spec(
        "adamax",
        lambda: kopt.Adamax(lr=2e-3),
        lambda: optax.adamax(2e-3, eps=EPS),
        2,
        ("Adamax", {"lr": 2e-3, "eps": EPS}),
    ),
    Spec(
        "nadam", lambda: kopt.Nadam(lr=2e-3), lambda: optax.nadam(2e-3, eps=EPS), 2, ("NAdam", {"lr": 2e-3, "eps": EPS})
    ),
    Spec(
        "adamw",
        lambda: kopt.AdamW(lr=1e-3, weight_decay=0.004),
        lambda: optax.adamw(1e-3, eps=EPS, weight_decay=0.004),
        2,
        ("AdamW", {"lr": 1e-3, "eps": EPS, "weight_decay": 0.004}),
        torch_fused=True,
    ),
    Spec(
        "clipnorm+adam",
        lambda: kopt.Adam(lr=1e-3, clipnorm=CLIPNORM),
        lambda: optax.chain(optax.clip_by_global_norm(CLIPNORM), optax.adam(1e-3, eps=EPS)),
        2,
        ("Adam", {"lr": 1e-3, "eps": EPS}),
        torch_fused=True,
        clipnorm=CLIPNORM,
    ),
    # kopt.packed: the same optimizers with their state in flat buffers (for trees of many small leaves).
    Spec(
        "adam packed",
        lambda: kopt.Adam(lr=1e-3, packed=True),
        lambda: optax.adam(1e-3, eps=EPS),
        2,
        ("Adam", {"lr": 1e-3, "eps": EPS}),
        torch_fused=True,
    ),
    Spec(
        "clipnorm+adam packed",
        lambda: kopt.Adam(lr=1e-3, clipnorm=CLIPNORM, packed=True),
        lambda: optax.chain(optax.clip_by_global_norm(CLIPNORM), optax.adam(1e-3, eps=EPS)),
        2,
        ("Adam", {"lr": 1e-3, "eps": EPS}),
        torch_fused=True,
        clipnorm=CLIPNORM,
    ),
]
# The optimizers of every measurement: the only ones on the big shapes in --quick, the only ones with the
# step without donation on the small leaves (compiles there cost ~10-30 s each), eager in --quick.
KEY = ("adam", "clipnorm+adam")


# ----------------------------------------------------------------------------- shapes


def f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def gpt2(n_layer: int, d: int, vocab: int, ctx: int = 1024) -> dict:
    """GPT-2's parameter tree (12 leaves per block + 4): n_layer=12, d=768, vocab=50257 is GPT-2 small."""

    def dense(n_in, n_out):
        return {"w": f32(n_in, n_out), "b": f32(n_out)}

    def norm():
        return {"g": f32(d), "b": f32(d)}

    def block():
        attn = {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)}
        mlp = {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)}
        return {"ln_1": norm(), "attn": attn, "ln_2": norm(), "mlp": mlp}

    return {"wte": f32(vocab, d), "wpe": f32(ctx, d), "h": [block() for _ in range(n_layer)], "ln_f": norm()}


def shapes(quick: bool) -> list[tuple[str, dict]]:
    big = gpt2(12, 384, 16384) if quick else gpt2(12, 768, 50257)
    leaves = zoo.small_leaves(500 if quick else 2000)
    width = 0.25 if quick else 1.0  # the model zoo's channel counts
    trees = [
        {"w": f32(1 << 24)},
        big,
        leaves,
        zoo.random_order(1000),
        zoo.distinct(500 if quick else 2000),
        zoo.resnet50(width),
        zoo.vit_b(width),
        zoo.unet(width),
        zoo.moe(width),
    ]
    names = ["1 leaf", "gpt2", "small leaves", "random order", "distinct", "resnet50", "vit-b", "unet", "moe"]
    return [
        (f"{name} {sum(math.prod(s.shape) for s in jax.tree.leaves(t)) / 1e6:.1f}M/{len(jax.tree.leaves(t))}", t)
        for name, t in zip(names, trees, strict=True)
    ]


def materialize(structure: Any, seed: int, scale: float) -> Any:
    """Fixed-seed normal values for every leaf of ``structure``."""
    leaves, treedef = jax.tree.flatten(structure)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [scale * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
    return treedef.unflatten(values)


# ----------------------------------------------------------------------------- measurements


@dataclasses.dataclass
class Row:
    shape: str
    optimizer: str
    impl: str  # kopt | optax | torch-foreach | torch-fused (train_step rows: kopt.train_step | optax)
    n_params: int
    n_leaves: int
    step_ms: float = NAN  # jitted update + apply, params and state donated (torch: its in-place step)
    loop_ms: float = NAN  # device time per step: K steps in one jitted fori_loop (GPU or --loop; torch: CUDA graph)
    step_nodonate_ms: float = NAN  # the same without donation (fresh output buffers)
    lower_s: float = NAN  # jax.jit(step, donate_argnums=(0, 1)).lower(...)
    compile_s: float = NAN  # lowered.compile() (train_step rows: first call, trace + compile + run)
    eager_first_ms: float = NAN  # first un-jitted opt.update (includes whatever it compiles)
    eager_ms: float = NAN  # median un-jitted opt.update afterwards
    kernels: float = NAN  # array kernels of the donated step (see kernel_count)
    xla_mb: float = NAN  # memory_analysis of the donated step: arguments + outputs - aliased + temporaries
    xla_nodonate_mb: float = NAN  # the same for the step without donation
    rss_peak_mb: float = NAN  # process peak RSS while this configuration ran (all contestants alive)
    gbps: float = NAN  # minimal traffic (Spec.traffic bytes per param) / step_ms
    triad_gbps: float = NAN  # the triad, timed interleaved with this configuration's steps
    # kopt / this row (peers only; < 1: kopt is faster)
    x_step: float = NAN
    x_step_nodonate: float = NAN
    x_compile: float = NAN
    x_eager: float = NAN


def interleaved(runners: dict[str, Callable[[], Any]], reps: int, burst_s: float = 0.03) -> dict[str, tuple]:
    """``{name: (first call s, median s per call)}`` of runners measured in alternation.

    Two warm-up calls each (the first is reported; the second sizes the bursts), then ``reps`` rounds in
    which every runner, starting from a different one each round, makes a timed burst of calls lasting
    about ``burst_s``; a sample is the burst's time per call. A runner faster than ``burst_s`` makes one
    untimed call before its burst: it absorbs the switch from the previous runner (caches, the other
    runtime's spinning threads), which would otherwise weigh on short calls.
    """
    names = list(runners)
    first, burst, settle, samples = {}, {}, {}, {name: [] for name in names}
    gc.collect()
    gc.disable()  # as timeit does: no collector pauses inside the timings
    try:
        for name in names:
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                runners[name]()
                times.append(time.perf_counter() - t0)
            first[name], burst[name] = times[0], max(1, min(20, round(burst_s / times[1])))
            settle[name] = times[1] < burst_s
        for r in range(reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if settle[name]:
                    runners[name]()
                t0 = time.perf_counter()
                for _ in range(burst[name]):
                    runners[name]()
                samples[name].append((time.perf_counter() - t0) / burst[name])
    finally:
        gc.enable()
    return {name: (first[name], statistics.median(samples[name])) for name in names}


def make_step(opt: Any, apply_updates: Callable) -> Callable:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return apply_updates(params, updates), state

    return step


def compile_step(opt: Any, apply_updates: Callable, args: tuple, donate: bool) -> tuple[Any, float, float]:
    """``(compiled, lowering s, compile s)`` of a fresh jitted step (no trace cache shared)."""
    t0 = time.perf_counter()
    lowered = jax.jit(make_step(opt, apply_updates), donate_argnums=(0, 1) if donate else ()).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def kernel_count(compiled: Any) -> int:
    """Array kernels: ops with a non-scalar result in the optimized HLO's entry computation, other than
    parameters, tuples, bitcasts and copies (scalar bookkeeping such as step counts is left out)."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :].split("\n}", 1)[0]
    count = 0
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) ([a-z][a-z0-9-]*)\(", line)
        if m and m.group(2) not in {"parameter", "tuple", "get-tuple-element", "bitcast", "copy"}:
            count += bool(re.search(r"\[\d", m.group(1)))
    return count


def xla_mb(compiled: Any) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return NAN
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / 2**20


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM


def peak_rss_mb() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return NAN


def free() -> None:
    """Drops what the last configuration left: jax's caches, then freed heap pages (glibc keeps them,
    which would make the next configuration's peak RSS include this one's)."""
    gc.collect()
    jax.clear_caches()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class JaxRun:
    """One library's params and state, stepped (and fed back) by compiled steps."""

    def __init__(self, params: Any, state: Any, grads: Any):
        self.params, self.state, self.grads = params, state, grads

    def step(self, compiled: Any) -> Callable[[], None]:
        def run():
            self.params, self.state = compiled(self.params, self.state, self.grads)
            jax.block_until_ready((self.params, self.state))

        return run

    def loop(self, opt: Any, apply_updates: Callable, steps: int) -> Callable[[], None]:
        step = make_step(opt, apply_updates)

        def many(params, state, grads):
            return jax.lax.fori_loop(0, steps, lambda _, carry: step(*carry, grads), (params, state))

        compiled = jax.jit(many, donate_argnums=(0, 1)).lower(self.params, self.state, self.grads).compile()
        return self.step(compiled)

    def eager(self, opt: Any) -> Callable[[], None]:
        def run():
            updates, self.state = opt.update(self.grads, self.state, self.params)
            jax.block_until_ready((updates, self.state))

        return run


class TorchRun:
    """torch.optim on a copy of the params; a step is (clip_grad_norm_ +) opt.step()."""

    def __init__(self, spec: Spec, params: Any, grads: list, impl: str):
        device = TORCH_DEVICE
        self.params = [torch.nn.Parameter(torch.from_numpy(np.array(p)).to(device)) for p in jax.tree.leaves(params)]
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g  # shared by the torch runs (clip_grad_norm_ rescales it in place: the same work)
        cls, kwargs = spec.torch
        graphed = impl == "fused-graph"
        options = {"fused": True, "capturable": True} if graphed else {impl: True}
        self.opt = getattr(torch.optim, cls)(self.params, **kwargs, **options)
        self.clipnorm = spec.clipnorm
        self.graph = None
        if graphed:  # the step captured once and replayed: no launch overhead (device time)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()

    def step(self) -> None:
        if self.clipnorm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clipnorm, foreach=True)
        self.opt.step()

    def __call__(self) -> None:
        self.graph.replay() if self.graph is not None else self.step()
        if TORCH_DEVICE == "cuda":
            torch.cuda.synchronize()


class Triad:
    """STREAM-like triad ``a = b + s * c`` on three float32 arrays of ``n``, jitted, ``a`` donated
    (12 bytes of traffic per element): timed beside every configuration, as the roofline."""

    def __init__(self, n: int = 1 << 24):
        self.n = n
        self.b, self.c = materialize((f32(n), f32(n)), seed=2, scale=1.0)
        self.a = jnp.zeros(n, jnp.float32)
        triad = jax.jit(lambda a, b, c: b + 3.0 * c, donate_argnums=0, keep_unused=True)
        self.fn = triad.lower(self.a, self.b, self.c).compile()

    def __call__(self) -> None:
        self.a = self.fn(self.a, self.b, self.c)
        self.a.block_until_ready()

    def gbps(self, seconds: float) -> float:
        return 12 * self.n / seconds / 1e9


def copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def measure(
    shape: str,
    params: Any,
    grads: Any,
    spec: Spec,
    triad: Triad,
    reps: int,
    eager_reps: int,
    nodonate: bool,
    loop: bool = ON_GPU,
) -> list[Row]:
    """Every metric of one (shape, optimizer) for kopt, optax and torch.optim, with the triad timed among
    them (the step without donation only if ``nodonate``, the eager update only if ``eager_reps``, the
    device time per step only if ``loop``)."""
    reset_peak_rss()
    n = sum(leaf.size for leaf in jax.tree.leaves(params))
    libs = {"kopt": (spec.kopt(), kopt.apply_updates), "optax": (spec.optax(), optax.apply_updates)}
    rows = {lib: Row(shape, spec.name, lib, n, len(jax.tree.leaves(params))) for lib in libs}
    runs, runners = {}, {}
    for lib, (opt, _) in libs.items():
        runs[lib] = JaxRun(copy(params), opt.init(params), grads)
    for donate in (True, False) if nodonate else (True,):  # compiles alternate kopt / optax too
        for lib, (opt, apply) in libs.items():
            run, row = runs[lib], rows[lib]
            compiled, lower_s, compile_s = compile_step(opt, apply, (run.params, run.state, grads), donate)
            runners[(lib, donate)] = run.step(compiled)
            if donate:
                row.lower_s, row.compile_s = lower_s, compile_s
                row.kernels, row.xla_mb = kernel_count(compiled), xla_mb(compiled)
            else:
                row.xla_nodonate_mb = xla_mb(compiled)
    if loop:  # device time: K steps in one jitted loop, so launch overhead is paid once per K
        for lib, (opt, apply) in libs.items():
            runners[(f"{lib}-loop", True)] = runs[lib].loop(opt, apply, LOOP_STEPS)
    if torch is not None and spec.torch:
        torch_grads = [torch.from_numpy(np.array(g)).to(TORCH_DEVICE) for g in jax.tree.leaves(grads)]
        fused = ("fused", "fused-graph") if TORCH_DEVICE == "cuda" else ("fused",)
        for impl in ("foreach", *fused) if spec.torch_fused else ("foreach",):
            if impl == "fused-graph":
                runners[("torch-fused-graph", True)] = TorchRun(spec, params, torch_grads, impl)
                continue
            rows[f"torch-{impl}"] = Row(shape, spec.name, f"torch-{impl}", n, len(jax.tree.leaves(params)))
            runners[(f"torch-{impl}", True)] = TorchRun(spec, params, torch_grads, impl)
    runners[("triad", True)] = triad
    for (lib, donate), (_, median) in interleaved(runners, reps).items():
        if lib == "triad":
            for row in rows.values():
                row.triad_gbps = triad.gbps(median)
        elif lib.endswith("-loop"):
            rows[lib[: -len("-loop")]].loop_ms = 1e3 * median / LOOP_STEPS
        elif lib == "torch-fused-graph":
            rows["torch-fused"].loop_ms = 1e3 * median
        elif donate:
            rows[lib].step_ms = 1e3 * median
        else:
            rows[lib].step_nodonate_ms = 1e3 * median
    del runners, runs, compiled
    free()
    runs = {lib: JaxRun(params, opt.init(params), grads) for lib, (opt, _) in libs.items()}  # fresh state
    if eager_reps:
        eager = interleaved({lib: run.eager(libs[lib][0]) for lib, run in runs.items()}, eager_reps)
        for lib, (first, median) in eager.items():
            rows[lib].eager_first_ms, rows[lib].eager_ms = 1e3 * first, 1e3 * median
    del runs
    free()
    for row in rows.values():
        row.rss_peak_mb = peak_rss_mb()
        row.gbps = spec.traffic * n / (row.step_ms / 1e3) / 1e9
    return finish(list(rows.values()))


def finish(rows: list[Row]) -> list[Row]:
    """Fills the kopt/peer ratios of the peer rows."""
    k = rows[0]
    for row in rows[1:]:
        row.x_step = k.step_ms / row.step_ms
        row.x_step_nodonate = k.step_nodonate_ms / row.step_nodonate_ms
        row.x_compile = (k.lower_s + k.compile_s) / (row.lower_s + row.compile_s)
        if math.isnan(row.x_compile):  # train_step rows: first call
            row.x_compile = k.compile_s / row.compile_s
        row.x_eager = k.eager_ms / row.eager_ms
    return rows


def measure_train_step(shape: str, params: Any, batch: Any, spec: Spec, reps: int) -> list[Row]:
    """``kopt.train_step(loss_fn, opt)`` against the same step written by hand for optax (value_and_grad,
    update, apply; jitted with params and state donated). The loss is sum(params . batch), so the
    gradient is the batch."""

    def loss_fn(params, batch):
        return sum(jnp.vdot(p, b) for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(batch), strict=True))

    def optax_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    opt = spec.optax()
    steps = {
        "kopt.train_step": (kopt.train_step(loss_fn, spec.kopt()), spec.kopt()),
        "optax": (jax.jit(optax_step, donate_argnums=(0, 1)), opt),
    }
    n = sum(leaf.size for leaf in jax.tree.leaves(params))
    runners = {}
    for impl, (step, o) in steps.items():
        box = [copy(params), o.init(params)]

        def run(step=step, box=box):
            box[0], box[1], loss = step(box[0], box[1], batch)
            jax.block_until_ready((box, loss))

        runners[impl] = run
    rows = []
    for impl, (first, median) in interleaved(runners, reps).items():
        rows.append(
            Row(
                shape,
                f"{spec.name} train_step",
                impl,
                n,
                len(jax.tree.leaves(params)),
                step_ms=1e3 * median,
                compile_s=first,
            )
        )
    del runners
    free()
    return finish(rows)


def nnx_models(quick: bool) -> dict[str, Callable[[], Any]]:
    """A ResNet-style CNN and a small transformer (Flax NNX), with a batch each."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, c, rngs):
            self.conv1, self.bn1 = nnx.Conv(c, c, (3, 3), rngs=rngs), nnx.BatchNorm(c, rngs=rngs)
            self.conv2, self.bn2 = nnx.Conv(c, c, (3, 3), rngs=rngs), nnx.BatchNorm(c, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))

    class CNN(nnx.Module):
        def __init__(self, rngs, widths=(16, 32, 64), blocks=4):
            self.stem = nnx.Conv(3, widths[0], (3, 3), rngs=rngs)
            self.stages = nnx.List([nnx.List([Block(w, rngs) for _ in range(blocks)]) for w in widths])
            self.downs = nnx.List([nnx.Conv(a, b, (1, 1), strides=2, rngs=rngs) for a, b in itertools.pairwise(widths)])
            self.head = nnx.Linear(widths[-1], 10, rngs=rngs)

        def __call__(self, x):
            x = self.stem(x)
            for k, stage in enumerate(self.stages):
                for block in stage:
                    x = block(x)
                if k < len(self.downs):
                    x = self.downs[k](x)
            return self.head(x.mean(axis=(1, 2)))

    class Layer(nnx.Module):
        def __init__(self, d, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
            self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.down(nnx.gelu(self.up(self.ln2(x))))

    class Transformer(nnx.Module):
        def __init__(self, rngs, d=128, layers=6, vocab=512):
            self.embed = nnx.Embed(vocab, d, rngs=rngs)
            self.layers = nnx.List([Layer(d, rngs) for _ in range(layers)])
            self.out = nnx.Linear(d, vocab, rngs=rngs)

        def __call__(self, x):
            h = self.embed(x)
            for layer in self.layers:
                h = layer(h)
            return self.out(h)

    rng = np.random.default_rng(0)
    images = (
        jnp.asarray(rng.normal(size=(8 if quick else 32, 16, 16, 3)), jnp.float32),
        jnp.arange(8 if quick else 32) % 10,
    )
    tokens = jnp.asarray(rng.integers(0, 512, size=(8, 64 if quick else 128)))
    return {
        "nnx resnet-style cnn": (lambda: CNN(nnx.Rngs(0)), images),
        "nnx transformer": (lambda: Transformer(nnx.Rngs(0)), (tokens, jnp.roll(tokens, -1, axis=1))),
    }


def measure_nnx_train_step(quick: bool, reps: int) -> list[Row]:
    """A whole Flax NNX train step (forward, backward, ``nnx.Optimizer.update``) with kopt's Adam (per leaf
    and packed) against optax's, on a ResNet-style CNN and a small transformer."""
    from flax import nnx

    def loss_fn(model, x, y):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    rows = []
    for shape, (make, (x, y)) in nnx_models(quick).items():
        contestants = {
            "kopt": lambda: kopt.Adam(lr=1e-3),
            "kopt packed": lambda: kopt.Adam(lr=1e-3, packed=True),
            "optax": lambda: optax.adam(1e-3, eps=EPS),
        }
        runners, leaves, n = {}, 0, 0
        for impl, tx in contestants.items():
            model = make()
            params = nnx.state(model, nnx.Param)
            leaves, n = len(jax.tree.leaves(params)), sum(p.size for p in jax.tree.leaves(params))
            optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)

            def run(model=model, optimizer=optimizer, x=x, y=y):
                jax.block_until_ready(train_step(model, optimizer, x, y))

            runners[impl] = run
        timed = interleaved(runners, reps)
        label = f"{shape} {n / 1e6:.1f}M/{leaves}"
        for packed in (False, True):
            k = timed["kopt packed" if packed else "kopt"]
            name = "adam packed nnx train step" if packed else "adam nnx train step"
            rows += finish(
                [
                    Row(label, name, "kopt", n, leaves, step_ms=1e3 * k[1], compile_s=k[0]),
                    Row(label, name, "optax", n, leaves, step_ms=1e3 * timed["optax"][1], compile_s=timed["optax"][0]),
                ]
            )
        del runners
        free()
    return rows


# ----------------------------------------------------------------------------- reporting


def fmt(x: float, digits: int = 2) -> str:
    if isinstance(x, float) and math.isnan(x):
        return ""
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits + 1}g}"


def pair(a: float, b: float) -> str:
    return "" if math.isnan(a) and math.isnan(b) else f"{fmt(a)} / {fmt(b)}"


def table(rows: list[Row]) -> list[str]:
    """Markdown, one line per (shape, optimizer): kopt / optax figures, their ratio, and torch."""
    head = [
        "shape (floats/leaves)",
        "optimizer",
        "step ms kopt / optax",
        "kopt/optax",
        "no-donation ms",
        "kopt/optax",
        "compile s",
        "kopt/optax",
        "eager ms",
        "kopt/optax",
        "kernels",
        "XLA MB",
        "kopt GB/s (% triad)",
        "torch ms fused / foreach",
        "kopt/fused",
        "kopt/foreach",
        "device ms/step kopt / optax / torch fused graph",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        by_key.setdefault((row.shape, row.optimizer), {})[row.impl] = row
    for (shape, name), impls in by_key.items():
        k = impls.get("kopt") or impls["kopt.train_step"]
        o = impls["optax"]
        fused, foreach = impls.get("torch-fused"), impls.get("torch-foreach")
        cells = [
            shape,
            name,
            pair(k.step_ms, o.step_ms),
            fmt(o.x_step),
            pair(k.step_nodonate_ms, o.step_nodonate_ms),
            fmt(o.x_step_nodonate),
            pair(k.lower_s + k.compile_s, o.lower_s + o.compile_s)
            if not math.isnan(k.lower_s)
            else pair(k.compile_s, o.compile_s),
            fmt(o.x_compile),
            pair(k.eager_ms, o.eager_ms),
            fmt(o.x_eager),
            pair(k.kernels, o.kernels),
            pair(k.xla_mb, o.xla_mb),
            "" if math.isnan(k.gbps) else f"{k.gbps:.1f} ({100 * k.gbps / k.triad_gbps:.0f}%)",
            pair(fused.step_ms if fused else NAN, foreach.step_ms if foreach else NAN),
            fmt(fused.x_step) if fused else "",
            fmt(foreach.x_step) if foreach else "",
            "" if math.isnan(k.loop_ms) else f"{pair(k.loop_ms, o.loop_ms)} / {fmt(fused.loop_ms if fused else NAN)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def kopt_revision() -> str:
    """The git commit kopt was imported from, and whether kopt/ had uncommitted changes."""
    root = Path(kopt.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "kopt")
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {commit}" + (" + uncommitted changes in kopt/" if dirty else "")


def machine_info() -> dict[str, str]:
    cpu, mem = "unknown", ""
    with contextlib.suppress(OSError, AttributeError):
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kib / 2**20:.0f} GiB"
    import jaxlib

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "memory": mem,
        "device": str(jax.devices()[0].device_kind),
        "python": platform.python_version(),
        "jax / jaxlib": f"{jax.__version__} / {jaxlib.__version__}",
        "optax": optax.__version__,
        "kopt": f"{kopt.__version__}, {kopt_revision()}, train_step: {'yes' if hasattr(kopt, 'train_step') else 'no'}",
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)" if torch else "not installed",
        "numpy": np.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def chart(rows: list[Row], path: Path) -> None:
    """Bar chart of the kopt/peer ratios: one panel per shape, grouped bars per optimizer, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metrics = [
        ("optax", "x_step", "step: kopt/optax"),
        ("optax", "x_step_nodonate", "step without donation: kopt/optax"),
        ("optax", "x_compile", "compile: kopt/optax"),
        ("optax", "x_eager", "eager update: kopt/optax"),
        ("torch-fused", "x_step", "step: kopt/torch fused"),
        ("torch-foreach", "x_step", "step: kopt/torch foreach"),
    ]
    shape_names = list(dict.fromkeys(row.shape for row in rows))
    fig, axes = plt.subplots(len(shape_names), 1, figsize=(13, 3.6 * len(shape_names)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shape_names, strict=True):
        names = list(dict.fromkeys(row.optimizer for row in rows if row.shape == shape))
        width = 0.8 / len(metrics)
        for i, (impl, field, label) in enumerate(metrics):
            values = []
            for name in names:
                match = [r for r in rows if r.shape == shape and r.optimizer == name and r.impl == impl]
                values.append(getattr(match[0], field) if match else NAN)
            ax.bar(np.arange(len(names)) + (i - (len(metrics) - 1) / 2) * width, values, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(np.arange(len(names)), names, fontsize=8)
        ax.set_ylabel("kopt / peer (< 1: kopt faster)", fontsize=8)
        ax.set_title(shape, fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(metrics), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[Row], lines: list[str], header: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "latest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(row) for row in rows)
    (out / "latest.md").write_text("\n".join([*header, "", *lines, "", "![kopt/peer ratios](ratios.png)", ""]))
    chart(rows, out / "ratios.png")


# ----------------------------------------------------------------------------- main


def header(args: argparse.Namespace, info: dict, load: list, rows: list[Row], elapsed: float) -> list[str]:
    """The markdown preamble: command, run time, machine, roofline, and how to read the table."""
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    command += "".join(
        f" --{k} {shlex.quote(v)}" for k, v in (("shapes", args.shapes), ("optimizers", args.optimizers)) if v
    )
    triads = [r.triad_gbps for r in rows if not math.isnan(r.triad_gbps)]
    key = ", ".join(KEY)
    scope = f" On the small leaves the step without donation is measured only for {key}." + (
        f" Quick mode runs only {key} on the shapes of >= 16M floats, the eager update only for {key}"
        " and `train_step` only for adam."
        if args.quick
        else ""
    )
    return [
        f"# kopt benchmarks ({'quick' if args.quick else 'full'})",
        "",
        f"`{command}`: {elapsed / 60:.1f} min. Medians of {args.reps} interleaved repetitions per step timing"
        f" ({args.eager_reps} for eager updates, at most 3 on the big shapes); a repetition is a timed burst of calls"
        " of ~30 ms (after one untimed call, for calls shorter than that).",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- STREAM-like triad (a = b + s*c, 3 x 16M float32, jitted, a donated; 12 bytes/element), timed among"
        f" every configuration: median {statistics.median(triads or [NAN]):.1f} GB/s"
        f" (min {min(triads or [NAN]):.1f}, max {max(triads or [NAN]):.1f})",
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in load[0])},"
        f" after: {'/'.join(f'{x:.1f}' for x in load[1])} (other processes on the machine inflate timings)",
        f"- peak process RSS (VmHWM): {max([r.rss_peak_mb for r in rows] or [NAN]):.0f} MB",
        "",
        "Ratios are kopt / peer (< 1: kopt is faster). Shapes are `floats (millions) / leaves`. Steps are"
        " update + apply_updates, jitted, params and state donated unless `no-donation`; `compile s` is lowering"
        " + compile of the donated step (for `train_step` rows: the first call, trace + compile + run); `eager ms`"
        " is an un-jitted `opt.update`. `kernels` counts the array ops of the optimized HLO; `XLA MB` is"
        " `memory_analysis()` of the donated step (arguments + outputs - aliased + temporaries). GB/s is minimal"
        " traffic (bytes per float32 param: SGD momentum, RMSprop, Adagrad 20; Adadelta, Adam, Adamax, Nadam,"
        " AdamW 28; clipnorm + Adam 32) per step time, beside the triad timed in the same configuration. Torch"
        " steps are in place (like donation); its clipnorm is `clip_grad_norm_(foreach=True)`." + scope,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller trees, fewer optimizers on big shapes")
    parser.add_argument("--shapes", default="", help="comma-separated substrings of shape names to run (default all)")
    parser.add_argument("--optimizers", default="", help="comma-separated optimizer names to run (default all)")
    parser.add_argument(
        "--loop", action="store_true", help="device time per step (K steps in one jitted loop) off a GPU too"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.reps, args.eager_reps = (7, 3) if args.quick else (15, 5)
    train_step_for = ("adam",) if args.quick else (*KEY, "adam packed", "clipnorm+adam packed")
    started = time.perf_counter()
    info = machine_info()
    load = [os.getloadavg()]
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)

    triad = Triad()
    rows: list[Row] = []
    for shape, structure in shapes(args.quick):
        if args.shapes and not any(s in shape for s in args.shapes.split(",")):
            continue
        params = materialize(structure, seed=0, scale=0.02)
        grads = materialize(structure, seed=1, scale=1e-3)
        big = sum(math.prod(s.shape) for s in jax.tree.leaves(structure)) >= 1 << 24
        for spec in OPTIMIZERS:
            if (args.optimizers and spec.name not in args.optimizers.split(",")) or (
                args.quick and big and spec.name not in KEY
            ):
                continue
            t0 = time.perf_counter()
            eager_reps = (
                0 if args.quick and spec.name not in KEY else min(args.eager_reps, 3) if big else args.eager_reps
            )
            nodonate = big or spec.name in KEY
            new = measure(shape, params, grads, spec, triad, args.reps, eager_reps, nodonate, ON_GPU or args.loop)
            rows += new
            print(
                f"[{time.perf_counter() - started:4.0f}s] {shape} {spec.name}: kopt {new[0].step_ms:.2f} ms,"
                f" kopt/optax {new[1].x_step:.2f} (no donation {new[1].x_step_nodonate:.2f},"
                f" compile {new[1].x_compile:.2f}, eager {new[1].x_eager:.2f})"
                + "".join(f", kopt/{r.impl} {r.x_step:.2f}" for r in new[2:])
                + f"; triad {new[0].triad_gbps:.0f} GB/s [{time.perf_counter() - t0:.0f}s]",
                flush=True,
            )
            if hasattr(kopt, "train_step") and spec.name in train_step_for:
                rows += measure_train_step(shape, params, grads, spec, args.reps)
        del params, grads
        free()
    if not args.shapes or "nnx" in args.shapes:
        rows += measure_nnx_train_step(args.quick, args.reps)
        print(f"[{time.perf_counter() - started:4.0f}s] nnx train steps", flush=True)
    load.append(os.getloadavg())
    elapsed = time.perf_counter() - started

    lines = table(rows)
    print("\n" + "\n".join(lines))
    print(f"\ntotal {elapsed / 60:.1f} min", flush=True)
    write(rows, lines, header(args, info, load, rows, elapsed), args.out)
    print(f"wrote {args.out / 'latest.csv'}, {args.out / 'latest.md'}, {args.out / 'ratios.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
