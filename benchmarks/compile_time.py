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
from pathlib import Path

import jax
import optax

import kopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # benchmarks/run.py: the trees, the peers, the step (and the persistent compilation cache off)

# The trees of benchmarks/run.py but its single 16M-float leaf (nothing to pack there).
TREES = [(name, structure) for name, structure in run.shapes(quick=False) if not name.startswith("1 leaf")]

# kopt's Adam with a layout option, and the same optax peer as run.py gives it.
PEERS = {spec.name: spec for spec in run.OPTIMIZERS}
KOPT = {
    "adam": lambda **layout: kopt.Adam(lr=1e-3, **layout),
    "clipnorm+adam": lambda **layout: kopt.Adam(lr=1e-3, clipnorm=run.CLIPNORM, **layout),
}

LAYOUTS = {"per leaf": {"packed": False}, "packed": {"packed": True}, "auto": {"packed": None}}


def compile_seconds(opt, params, grads) -> float:
    jax.clear_caches()  # no kernel or trace of an earlier contestant reused
    _, _, seconds = run.compile_step(opt, optax.apply_updates, (params, opt.init(params), grads), donate=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default="", help="comma-separated substrings of tree names (default all)")
    parser.add_argument("--optimizers", default=",".join(KOPT), help="adam, clipnorm+adam")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    wanted = [w for w in args.trees.split(",") if w]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {args.rounds} rounds, fastest round shown")
    print("| tree | leaves | optimizer | optax s | per leaf s (x) | packed s (x) | auto s (x) | packed x range |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for tree_name, structure in TREES:
        if wanted and not any(w in tree_name for w in wanted):
            continue
        params = run.materialize(structure, 0, 0.1)
        grads = run.materialize(structure, 1, 0.01)
        for opt_name in args.optimizers.split(","):
            make_kopt, make_optax = KOPT[opt_name], PEERS[opt_name].optax
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
