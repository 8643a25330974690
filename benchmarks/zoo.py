"""Parameter trees of real models (shapes only, as ``jax.ShapeDtypeStruct``), for benchmarks/run.py.

Each builder takes ``width``: 1 is the published model, smaller values scale every channel count
(``--quick``). Leaf order is the order the layers are defined in, as Flax and Equinox keep it.
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp


def f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _c(channels: int, width: float) -> int:
    return max(1, int(channels * width))


def dense(n_in: int, n_out: int) -> dict:
    return {"kernel": f32(n_in, n_out), "bias": f32(n_out)}


def norm(d: int) -> dict:
    return {"scale": f32(d), "bias": f32(d)}


def conv(k: int, c_in: int, c_out: int, bias: bool = False) -> dict:
    return {"kernel": f32(k, k, c_in, c_out), **({"bias": f32(c_out)} if bias else {})}


def resnet50(width: float = 1.0) -> dict:
    """ResNet-50 (25.6M floats, 161 leaves): bottleneck stages of 3, 4, 6, 3 blocks, batch norms."""
    stem = _c(64, width)
    tree: dict = {"stem": {"conv": conv(7, 3, stem), "bn": norm(stem)}}
    c_in = stem
    for stage, (blocks, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        w = _c(w, width)
        for b in range(blocks):
            block = {
                "conv1": conv(1, c_in, w),
                "bn1": norm(w),
                "conv2": conv(3, w, w),
                "bn2": norm(w),
                "conv3": conv(1, w, 4 * w),
                "bn3": norm(4 * w),
            }
            if b == 0:
                block["proj"] = {"conv": conv(1, c_in, 4 * w), "bn": norm(4 * w)}
            tree[f"stage{stage}_block{b}"] = block
            c_in = 4 * w
    tree["head"] = dense(c_in, 1000)
    return tree


def vit_b(width: float = 1.0) -> dict:
    """ViT-B/16 (86.6M floats, 152 leaves): patch embedding, 12 pre-norm blocks, classification head."""
    d, mlp = _c(768, width), _c(3072, width)
    blocks = [
        {
            "ln1": norm(d),
            "qkv": dense(d, 3 * d),
            "proj": dense(d, d),
            "ln2": norm(d),
            "fc1": dense(d, mlp),
            "fc2": dense(mlp, d),
        }
        for _ in range(12)
    ]
    return {
        "patch": conv(16, 3, d, bias=True),
        "cls": f32(1, 1, d),
        "pos": f32(1, 197, d),
        "blocks": blocks,
        "ln": norm(d),
        "head": dense(d, 1000),
    }


def unet(width: float = 1.0) -> dict:
    """U-Net (31M floats, 46 leaves): 5 levels of two 3x3 convs, transposed-conv upsampling, 1x1 head."""
    chans = [_c(c, width) for c in (64, 128, 256, 512, 1024)]
    tree: dict = {}
    c_in = 3
    for level, c in enumerate(chans):
        tree[f"down{level}"] = {"conv1": conv(3, c_in, c, True), "conv2": conv(3, c, c, True)}
        c_in = c
    for level in range(len(chans) - 2, -1, -1):
        c = chans[level]
        tree[f"up{level}"] = {
            "up": conv(2, c_in, c, True),
            "conv1": conv(3, 2 * c, c, True),
            "conv2": conv(3, c, c, True),
        }
        c_in = c
    tree["head"] = conv(1, c_in, 2, True)
    return tree


def moe(width: float = 1.0, layers: int = 8, experts: int = 8) -> dict:
    """A mixture-of-experts transformer stack (35.9M floats, 338 leaves: d=256, 8 layers of attention,
    a router and 8 experts)."""
    d = _c(256, width)
    return {
        "layers": [
            {
                "ln1": norm(d),
                "attn": {"qkv": dense(d, 3 * d), "out": dense(d, d)},
                "ln2": norm(d),
                "router": dense(d, experts),
                "experts": [{"up": dense(d, 4 * d), "down": dense(4 * d, d)} for _ in range(experts)],
            }
            for _ in range(layers)
        ],
        "ln_f": norm(d),
    }


def small_leaves(n: int) -> dict:
    """``n`` small leaves in blocks of the same 40 distinct shapes (biases, dense, conv, embeddings;
    ~985 floats a leaf on average), as a model made of repeated blocks has."""

    def shape(i):
        j = i // 4
        return [(128 * (j + 1),), (8 * (j + 2), 32), (3, 3, j + 4, 16), (j + 1, 64)][i % 4]

    tree: dict = {}
    for k in range(n):
        tree.setdefault(f"block{k // 40:02d}", {})[f"p{k % 40:02d}"] = f32(*shape(k % 40))
    return tree


def random_order(n: int = 1000, kinds: int = 40, seed: int = 0) -> dict:
    """``n`` small 2-D leaves of ``kinds`` shapes in random order: no repeated block to exploit."""
    rng = random.Random(seed)
    shapes = [(rng.randint(1, 64), rng.randint(1, 32)) for _ in range(kinds)]
    return {f"p{k:04d}": f32(*rng.choice(shapes)) for k in range(n)}


def distinct(n: int = 2000) -> dict:
    """``n`` 1-D leaves of 1 to ~2000 floats, sizes seldom repeated (83 sizes in 500 leaves, 297 in 2000)."""
    return {f"p{k:04d}": f32(k + 1 + (k % 7) * 13) for k in range(n)}
