"""Muon: ``kopt.orthogonalize_by_newton_schulz`` against a NumPy transcription of Keras 3's iteration (float32,
float64) and against what the iteration is (a map of each singular value; the polar factor when it converges),
and ``kopt.keras.Muon`` against Keras 3's ``Muon`` built from its ``serialize()`` dict alone."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kopt
from tests.stepping import LIVE, arrays, assert_follows_rule

KERAS_ABC = (3.4445, -4.7750, 2.0315)  # Keras 3's muon_a, muon_b, muon_c
SHAPES = [(3, 5), (6, 2), (2, 4, 3)]  # wide, tall (transposed first), a batch of tall matrices
STEPS = 5


def swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def numpy_newton_schulz(g, steps, abc=KERAS_ABC, epsilon=1e-7, rms_rate=None):
    """Keras 3's ``zeropower_via_newtonschulz5`` and ``lr_adjust`` (on the last two axes), in ``g``'s dtype."""
    a, b, c = abc
    tall = g.shape[-2] > g.shape[-1]
    x = swap(g) if tall else g
    x = x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) + epsilon)
    for _ in range(steps):
        gram = x @ swap(x)
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = swap(x) if tall else x
    return x if rms_rate is None else x * np.sqrt(max(g.shape[-2:])) * rms_rate


def numpy_muon_rule(params, grads, lr, momentum, nesterov, **newton_schulz):
    """Muon's matrix step as Keras 3 writes it: ``m <- m + (g + m*(momentum - 1))``, the (look-ahead) momentum
    orthogonalised, ``p <- p - lr * update``."""
    m = [np.zeros_like(p) for p in params]
    trajectory = []
    for step in grads:
        for k, g in enumerate(step):
            m[k] = m[k] + (g + m[k] * (momentum - 1))
            direction = g + momentum * m[k] if nesterov else m[k]
            params[k] = params[k] - lr * numpy_newton_schulz(direction, **newton_schulz)
        trajectory.append([p.copy() for p in params])
    return trajectory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [True, False])
def test_newton_schulz_with_momentum_is_keras_rule(dtype, nesterov):
    with jax.enable_x64(dtype == np.float64):
        params = arrays(0, SHAPES, dtype=dtype)
        grads = arrays(1, SHAPES, STEPS, dtype=dtype)
        expected = numpy_muon_rule(
            [p.copy() for p in params], grads, 0.1, 0.9, nesterov, steps=5, abc=KERAS_ABC, rms_rate=0.3
        )
        opt = kopt.chain(
            kopt.trace(0.9, nesterov=nesterov),
            kopt.orthogonalize_by_newton_schulz(5, KERAS_ABC, rms_rate=0.3),
            kopt.scale_by_learning_rate(0.1),
        )
        assert_follows_rule(opt, params, grads, expected)


def singular_values(x) -> np.ndarray:
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def scalar_map(s: np.ndarray, steps: int, abc=KERAS_ABC) -> np.ndarray:
    """What the iteration does to each singular value: ``s <- a*s + b*s**3 + c*s**5``, ``steps`` times."""
    a, b, c = abc
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def test_each_singular_value_goes_through_the_scalar_map_into_the_band():
    """``X = U S V^T`` gives ``U p(S) V^T``: the singular values of the result are those of ``G / ||G||_F``
    through the quintic, wide, tall and batched alike. With many steps each settles in the band the quintic's
    iteration keeps ``(0, 1]`` in (its range after settling, found by iterating it on a grid)."""
    band = scalar_map(np.linspace(1e-3, 1.0, 4001), 60)[None]
    band = scalar_map(band, 1).min(), scalar_map(band, 1).max()  # one more step: the band is invariant
    with jax.enable_x64(True):
        grads = arrays(2, [(4, 7), (9, 3), (2, 5, 4)], dtype=np.float64)
        for steps in (5, 60):
            opt = kopt.orthogonalize_by_newton_schulz(steps, rms_rate=None, epsilon=0.0)
            grads_jax = [jnp.asarray(g) for g in grads]
            updates, _ = opt.update(grads_jax, opt.init(grads_jax))  # float64 params: float64 coefficients
            for g, u in zip(grads, updates, strict=True):
                s = np.linalg.svd(g, compute_uv=False)
                expected = scalar_map(s / np.linalg.norm(g, axis=(-2, -1))[..., None], steps)
                np.testing.assert_allclose(
                    np.sort(np.linalg.svd(np.asarray(u), compute_uv=False)), np.sort(expected), rtol=1e-10
                )
                if steps == 60:
                    assert band[0] - 1e-9 <= expected.min() and expected.max() <= band[1] + 1e-9
    assert 0.5 < band[0] < 1 < band[1] < 1.5  # a band around 1, not 1: the price of five steps


def test_convergent_coefficients_give_the_polar_factor():
    """With the cubic ``(1.5, -0.5, 0)`` (convergent for singular values in ``(0, sqrt 3)``) the iteration
    reaches ``U V^T`` of ``G = U S V^T``; ``rms_rate`` scales it by ``rms_rate * sqrt(max(rows, columns))``."""
    g = np.random.default_rng(3).normal(size=(5, 3))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    with jax.enable_x64(True):
        opt = kopt.orthogonalize_by_newton_schulz(60, (1.5, -0.5, 0.0), rms_rate=0.2)
        updates, _ = opt.update(jnp.asarray(g), opt.init(jnp.asarray(g)))
    np.testing.assert_allclose(np.asarray(updates), u @ vt * 0.2 * np.sqrt(5), atol=1e-9)


def test_refusals():
    opt = kopt.orthogonalize_by_newton_schulz()
    with pytest.raises(ValueError, match=r"updates\['bias'\] has shape \(3,\)"):
        opt.update({"bias": jnp.zeros(3), "kernel": jnp.zeros((3, 2))}, opt.init(None))
    with pytest.raises(ValueError, match="works leaf by leaf"):
        packed = kopt.packed(opt)
        params = [jnp.zeros((2, 2))] * 3
        packed.update(params, packed.init(params), params)
    injected = optax.inject_hyperparams(kopt.orthogonalize_by_newton_schulz)(ns_steps=5)
    with pytest.raises(ValueError, match="static_args"):  # a traced loop count
        jax.jit(injected.update)(jnp.ones((2, 2)), injected.init(jnp.zeros((2, 2))))
    for bad in ({"coefficients": (1.0, 2.0)}, {"epsilon": -1.0}, {"rms_rate": -0.1}, {"ns_steps": 2.5}):
        with pytest.raises(ValueError):
            kopt.orthogonalize_by_newton_schulz(**bad)


def test_in_an_optax_chain_and_with_injected_hyperparams():
    """An optax transformation beside it, and optax.inject_hyperparams over it: the same step."""
    g = jnp.asarray(arrays(4, [(3, 4)])[0])
    alone = kopt.orthogonalize_by_newton_schulz()
    expected, _ = alone.update(g, alone.init(g))
    chained = optax.chain(alone, optax.scale(-1.0))
    updates, _ = chained.update(g, chained.init(g))
    chex.assert_trees_all_close(updates, -expected, atol=1e-6)  # jit vs eager: float32 rounding
    injected = optax.inject_hyperparams(kopt.orthogonalize_by_newton_schulz, static_args=("ns_steps",))(rms_rate=0.2)
    updates, state = jax.jit(injected.update)(g, injected.init(g))
    chex.assert_trees_all_close(updates, expected, atol=1e-6)
    assert float(state.hyperparams["rms_rate"]) == pytest.approx(0.2)


# --------------------------------------------------------------------------- Keras 3's Muon, live

#: A small model's variables by Keras path: a tall and a wide kernel (Muon's), a bias and a 3-D kernel (AdamW:
#: not 2-D), an embedding table (AdamW unless exclude_embeddings=False).
VARIABLES = {
    "conv/kernel": (2, 3, 4),
    "dense/bias": (3,),
    "dense/kernel": (4, 3),
    "embedding/embeddings": (6, 3),
    "head/kernel": (3, 5),
}
MUON_CASES = {
    "defaults": {},
    "no nesterov, exclusions, adam share": {
        "nesterov": False,
        "momentum": 0.9,
        "exclude_layers": ["head"],
        "exclude_embeddings": False,
        "weight_decay": None,
        "adam_weight_decay": 0.1,
        "adam_lr_ratio": 0.1,
        "adam_beta_1": 0.8,
        "adam_beta_2": 0.99,
        "epsilon": 1e-5,
    },
    "schedule, decay, scaling, steps, coefficients": {
        "schedule": True,
        "weight_decay": 0.1,
        "adam_weight_decay": None,
        "rms_rate": None,
        "ns_steps": 3,
        "muon_a": 3.0,
        "muon_b": -3.2,
        "muon_c": 1.2,
        "exclude_layers": ["^dense/"],
        "global_clipnorm": 1.0,
    },
}


def tree(flat: dict) -> dict:
    """``{"dense/kernel": x}`` as ``{"dense": {"kernel": x}}``: the tree whose Keras paths are the keys."""
    nested: dict = {}
    for path, value in flat.items():
        layer, name = path.split("/")
        nested.setdefault(layer, {})[name] = value
    return nested


def keras_muon(keras, case: str):
    kwargs = dict(MUON_CASES[case])
    rate = 0.02
    if kwargs.pop("schedule", False):
        rate = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
    return keras.optimizers.Muon(rate, **kwargs)


@pytest.mark.parametrize("case", MUON_CASES)
def test_keras_muon_follows_keras3(case):
    """``kopt.deserialize(keras.optimizers.serialize(Muon(...)))`` takes Keras 3's steps, within the suite's
    bound for Keras references (2e-6 + 2e-5 |keras|, float32; the Newton-Schulz steps need no looser), and a
    wrong coefficient is caught."""
    keras = pytest.importorskip("keras", reason="the keras3 extra is not installed")
    import json

    k_opt = keras_muon(keras, case)
    config = json.loads(json.dumps(keras.optimizers.serialize(k_opt)))
    opt = kopt.deserialize(config)
    assert opt.class_name == "Muon" and kopt.serialize(opt) == config

    rng = np.random.default_rng(5)
    start = {path: rng.normal(size=shape).astype(np.float32) for path, shape in VARIABLES.items()}
    k_vars = []
    for path, value in start.items():
        layer, name = path.split("/")
        with keras.name_scope(layer):
            k_vars.append(keras.Variable(value, name=name))
    assert [v.path for v in k_vars] == list(VARIABLES)
    k_opt.build(k_vars)
    grads = [{path: rng.normal(size=shape).astype(np.float32) for path, shape in VARIABLES.items()} for _ in range(6)]

    step = jax.jit(lambda p, s, g: (lambda u, s: (kopt.apply_updates(p, u), s))(*opt.update(g, s, p)))
    params = jax.tree.map(jnp.asarray, tree(start))
    state = opt.init(params)
    initial_state = state
    for g in grads:
        k_opt.apply([keras.ops.convert_to_tensor(g[path]) for path in VARIABLES], k_vars)
        params, state = step(params, state, tree(g))
        expected = tree({path: np.asarray(v.value) for path, v in zip(VARIABLES, k_vars, strict=True)})
        chex.assert_trees_all_close(params, expected, **LIVE)

    # The same run with muon_c off by 1e-3 (relative) leaves the bound: the test sees the coefficients.
    wrong = kopt.set_hyperparams(initial_state, muon_c=float(config["config"]["muon_c"]) * 1.001)
    params = jax.tree.map(jnp.asarray, tree(start))
    for g in grads:
        params, wrong = step(params, wrong, tree(g))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(params, expected, **LIVE)


def test_muon_labels_on_pytrees_and_bounded_patterns():
    """Keras' rule on :func:`kopt.keras_variable_path`: Flax Linen's ``params`` dropped, list indices as
    numbers, ``embedding`` found in any key in any case; patterns are searched (not fully matched) and a
    pattern that could match in exponential time, or a bare string, is refused."""
    leaves = {"Embed_0": {"embedding": (7, 3)}, "Dense_0": {"kernel": (3, 3), "bias": (3,)}, "TokEmbedding": (5, 3)}
    params = {"params": {**leaves, "blocks": [{"kernel": (3, 3)}, {"kernel": (3, 3)}]}}
    params = jax.tree.map(jnp.zeros, params, is_leaf=lambda x: isinstance(x, tuple))
    labels = kopt.keras.muon_labels(exclude_layers=[r"blocks/1/"])(params)["params"]
    assert labels["Embed_0"]["embedding"] == labels["TokEmbedding"] == labels["Dense_0"]["bias"] == "adamw"
    assert labels["Dense_0"]["kernel"] == labels["blocks"][0]["kernel"] == "muon"
    assert labels["blocks"][1]["kernel"] == "adamw"
    assert kopt.keras.muon_labels(exclude_embeddings=False)(params)["params"]["Embed_0"]["embedding"] == "muon"
    for bad in (["(a+)+$"], ["x" * 300], "head", [3]):
        with pytest.raises(ValueError, match="exclude_layers"):
            kopt.keras.Muon(exclude_layers=bad)


def test_muon_layouts_and_optax_chain():
    """The default layout (``packed=None``) keeps Muon's leaves apart, ``packed=True`` is refused; inside an
    optax chain it takes the same step."""
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    grads = jax.tree.map(lambda p: jnp.asarray(arrays(6, [p.shape])[0]), params)
    opt = kopt.keras.Muon(0.01)
    expected, _ = opt.update(grads, opt.init(params), params)
    chained = optax.chain(opt, optax.scale(1.0))
    updates, _ = chained.update(grads, chained.init(params), params)
    chex.assert_trees_all_close(updates, expected, atol=1e-7)
    with pytest.raises(ValueError, match="cannot be packed"):
        kopt.keras.Muon(packed=True)
