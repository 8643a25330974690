"""The default layout (packed=None, "auto") against per leaf and optax: step, compile, memory.

    python benchmarks/default_layout.py             # every tree, Adam and clipnorm + Adam (~35 min on 2 cores)
    python benchmarks/default_layout.py --quick     # the --quick trees of run.py (~25 min on 2 cores)
    python benchmarks/default_layout.py --trees resnet,bf16 --rounds 3

For each tree and optimizer, three contestants live in one process: kopt with ``packed=None`` ("auto":
the default: the leaves that can share a buffer are packed), kopt per leaf (``packed=False``) and
optax's peer from run.py. Each step is
``update`` + ``apply_updates`` jitted with params and state donated, exactly run.py's step. Metrics:

* *step*: the median of interleaved bursts (run.py's ``interleaved``: every contestant in turn,
  starting from a rotating one), so a burst of load on the machine falls on all three;
* *compile*: ``lowered.compile()`` after ``jax.clear_caches()``, the fastest of ``--rounds`` cold compiles
  made in rotating order;
* *memory*: the compiled step's own account (``memory_analysis``: arguments + outputs - aliased +
  temporaries), in MiB;
* *extra*: auto's memory beyond per leaf, in gradient-sized buffers of the packed leaves.

The trees are run.py's (``run.shapes``), plus a mixed-dtype tree (the small leaves in bfloat16 beside
float32 ones) and, with ``--devices N`` (XLA's host platform split into N devices), ResNet-50's tree with
its big leaves sharded over the devices. Results go to ``results/<date>_<commit>_default_layout.md``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from pathlib import Path


def _devices_flag(argv: list[str]) -> None:
    # XLA reads the host device count once, at JAX's start: set it before jax is imported.
    if "--devices" in argv:
        count = argv[argv.index("--devices") + 1]
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"


_devices_flag(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import kopt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (benchmarks/run.py: the trees, the peers, the step, the timer)
import zoo  # noqa: E402

OPTIMIZERS = {
    "adam": (lambda **layout: kopt.Adam(lr=1e-3, **layout), lambda: optax.adam(1e-3, eps=run.EPS)),
    "clipnorm+adam": (
        lambda **layout: kopt.Adam(lr=1e-3, clipnorm=run.CLIPNORM, **layout),
        lambda: optax.chain(optax.clip_by_global_norm(run.CLIPNORM), optax.adam(1e-3, eps=run.EPS)),
    ),
}
CONTESTANTS = ("auto", "per leaf", "optax")


def mixed_dtypes(quick: bool) -> dict:
    """run.py's many small leaves in bfloat16 beside the same number in float32 (two dtypes, two buffer sets)."""
    leaves = zoo.small_leaves(250 if quick else 1000)
    bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), leaves)
    return {"bf16": bf16, "f32": zoo.small_leaves(250 if quick else 1000)}


def trees(quick: bool, devices: int) -> list[tuple[str, dict, bool]]:
    """``(name, structure, sharded)`` of every tree measured."""
    named = [(name, structure, False) for name, structure in run.shapes(quick)]
    leaves = mixed_dtypes(quick)
    named.append(
        (
            f"bf16+f32 {sum(math.prod(s.shape) for s in jax.tree.leaves(leaves)) / 1e6:.1f}M/"
            f"{len(jax.tree.leaves(leaves))}",
            leaves,
            False,
        )
    )
    if devices > 1:
        resnet = zoo.resnet50(0.25 if quick else 1.0)
        named.append((f"resnet50 sharded x{devices}", resnet, True))
    return named


def place(params: dict, sharded: bool) -> dict:
    """``params`` on one device, or their big leaves split along their first divisible axis over all devices."""
    if not sharded:
        return params
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    count = len(jax.devices())

    def put(leaf):
        spec = [None] * leaf.ndim
        axis = next((a for a, n in enumerate(leaf.shape) if n % count == 0 and n >= count), None)
        if leaf.size >= kopt.packing.ALONE and axis is not None:
            spec[axis] = "d"
        return jax.device_put(leaf, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    return jax.tree.map(put, params)


def measure(name: str, structure: dict, sharded: bool, optimizer: str, reps: int, rounds: int, first: int = 0) -> dict:
    make_kopt, make_optax = OPTIMIZERS[optimizer]
    params = place(run.materialize(structure, 0, 1.0), sharded)
    grads = place(run.materialize(structure, 1, 1e-2), sharded)
    opts = {"auto": make_kopt(packed=None), "per leaf": make_kopt(packed=False), "optax": make_optax()}
    applies = {"auto": kopt.apply_updates, "per leaf": kopt.apply_updates, "optax": optax.apply_updates}
    compile_s = {c: math.inf for c in CONTESTANTS}
    for r in range(rounds):  # cold compiles in rotating order: load falls on every contestant alike
        k = (r + first) % 3  # rotated over rounds and rows: no contestant always compiles first
        for c in CONTESTANTS[k:] + CONTESTANTS[:k]:
            jax.clear_caches()
            args = (params, opts[c].init(params), grads)
            _, _, seconds = run.compile_step(opts[c], applies[c], args, donate=True)
            compile_s[c] = min(compile_s[c], seconds)
    runners, memory = {}, {}
    for c in CONTESTANTS:
        state = opts[c].init(params)
        jax_run = run.JaxRun(run.copy(params), state, grads)
        compiled, _, _ = run.compile_step(opts[c], applies[c], (jax_run.params, jax_run.state, grads), donate=True)
        memory[c] = run.xla_mb(compiled)
        runners[c] = jax_run.step(compiled)
    step = {c: 1e3 * median for c, (_, median) in run.interleaved(runners, reps).items()}
    packed_bytes = sum(
        leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params) if leaf.size < kopt.packing.ALONE
    )
    extra = (memory["auto"] - memory["per leaf"]) * 2**20 / packed_bytes if packed_bytes else 0.0
    del runners
    run.free()
    return {"tree": name, "optimizer": optimizer, "step": step, "compile": compile_s, "memory": memory, "extra": extra}


def table(results: list[dict]) -> list[str]:
    lines = [
        "| tree | optimizer | step ms: auto / per leaf / optax | auto/optax | auto/per leaf "
        "| compile s: auto / per leaf / optax | auto/optax | auto/per leaf "
        "| memory MiB: auto / per leaf / optax | auto/per leaf | extra (grad-sized buffers of packed leaves) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s, c, m = r["step"], r["compile"], r["memory"]
        lines.append(
            f"| {r['tree']} | {r['optimizer']} "
            f"| {s['auto']:.2f} / {s['per leaf']:.2f} / {s['optax']:.2f} "
            f"| {s['auto'] / s['optax']:.2f} | {s['auto'] / s['per leaf']:.2f} "
            f"| {c['auto']:.2f} / {c['per leaf']:.2f} / {c['optax']:.2f} "
            f"| {c['auto'] / c['optax']:.2f} | {c['auto'] / c['per leaf']:.2f} "
            f"| {m['auto']:.1f} / {m['per leaf']:.1f} / {m['optax']:.1f} "
            f"| {m['auto'] / m['per leaf']:.3f} | {r['extra']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="run.py's --quick trees")
    parser.add_argument("--trees", default="", help="comma-separated substrings of tree names (default: all)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="adam, clipnorm+adam")
    parser.add_argument("--rounds", type=int, default=2, help="cold compiles per contestant (the fastest counts)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--devices", type=int, default=1, help="host devices, for the sharded tree (set at start)")
    args = parser.parse_args(argv)
    wanted = [w for w in args.trees.split(",") if w]
    results = []
    started = datetime.datetime.now()
    for name, structure, sharded in trees(args.quick, args.devices):
        if wanted and not any(w in name for w in wanted):
            continue
        for optimizer in args.optimizers.split(","):
            results.append(measure(name, structure, sharded, optimizer, args.reps, args.rounds, len(results)))
            print(table(results)[-1], flush=True)
    info = run.machine_info()
    header = [
        "# The default layout (packed=None, auto) against per leaf and optax",
        "",
        f"`python benchmarks/default_layout.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{(datetime.datetime.now() - started).total_seconds() / 60:.0f} min. Step: median of interleaved, donated "
        f"steps; compile: fastest of {args.rounds} cold compiles; memory: the compiled step's memory_analysis.",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        "",
    ]
    text = "\n".join([*header, *table(results), ""])
    print(text)
    revision = run.kopt_revision().split()[1] if run.kopt_revision().startswith("commit") else "unknown"
    only = "_" + "-".join(wanted) if wanted else ""  # a run of some trees does not overwrite the whole table
    out = run.RESULTS / f"{datetime.date.today().isoformat()}_{revision}_default_layout{only}.md"
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
