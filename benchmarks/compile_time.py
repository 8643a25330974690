"""Compile time only: kopt per leaf, packed and auto against optax, repeated cold compiles.

    python benchmarks/compile_time.py                      # every tree, Adam and clipnorm + Adam, 3 rounds
    python benchmarks/compile_time.py --trees resnet,gpt2 --rounds 5

A compile is ``jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()`` of the
same step as benchmarks/run.py (update + ``apply_updates``), after ``jax.clear_caches()`` and with
the persistent compilation cache off, so every compile is a real one. Each round compiles every
contestant once, starting from a rotating one, so a burst of load on the machine falls on all of
them; the table gives each contestant's fastest round (the least disturbed) and the ratio to optax's
fastest (< 1: kopt compiles faster), and the spread of the ratios over the rounds. Run it on an idle
machine: single compiles move by 2x under load (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import optax

import kopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # benchmarks/run.py: the trees, the step, materialize
import zoo

jax.config.update("jax_enable_compilation_cache", False)

TREES = {
    "small leaves": lambda: run.small_leaves(2000),
    "random order": lambda: zoo.random_order(1000),
    "distinct": lambda: zoo.distinct(2000),
    "resnet50": zoo.resnet50,
    "vit-b": zoo.vit_b,
    "unet": zoo.unet,
    "moe": zoo.moe,
    "gpt2": lambda: run.gpt2(12, 768, 50257),
}

OPTIMIZERS = {
    "adam": (lambda **kw: kopt.Adam(lr=1e-3, **kw), lambda: optax.adam(1e-3, eps=run.EPS)),
    "clipnorm+adam": (
        lambda **kw: kopt.Adam(lr=1e-3, clipnorm=run.CLIPNORM, **kw),
        lambda: optax.chain(optax.clip_by_global_norm(run.CLIPNORM), optax.adam(1e-3, eps=run.EPS)),
    ),
}

LAYOUTS = {"per leaf": {"packed": False}, "packed": {"packed": True}, "auto": {"packed": None}}


def compile_seconds(opt, params, grads) -> float:
    state = opt.init(params)
    step = run.make_step(opt, optax.apply_updates)
    jax.clear_caches()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    t0 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default="", help="comma-separated substrings of tree names (default all)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="adam, clipnorm+adam")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    wanted = [w for w in args.trees.split(",") if w]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {args.rounds} rounds, fastest round shown")
    print("| tree | leaves | optimizer | optax s | per leaf s (x) | packed s (x) | auto s (x) | packed x range |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for tree_name, build in TREES.items():
        if wanted and not any(w in tree_name for w in wanted):
            continue
        structure = build()
        params = run.materialize(structure, 0, 0.1)
        grads = run.materialize(structure, 1, 0.01)
        for opt_name in args.optimizers.split(","):
            make_kopt, make_optax = OPTIMIZERS[opt_name]
            contestants = {
                "optax": make_optax,
                **{k: functools.partial(make_kopt, **kw) for k, kw in LAYOUTS.items()},
            }
            names = list(contestants)
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    times[name].append(compile_seconds(contestants[name](), params, grads))
            best = {name: min(ts) for name, ts in times.items()}
            ratios = [p / o for p, o in zip(times["packed"], times["optax"], strict=True)]
            cells = [f"{best[k]:.2f} ({best[k] / best['optax']:.2f})" for k in LAYOUTS]
            print(
                f"| {tree_name} | {len(jax.tree.leaves(structure))} | {opt_name} | {best['optax']:.2f} | "
                + " | ".join(cells)
                + f" | {min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
