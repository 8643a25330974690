"""Training-loop transforms, each with and without jit (chex.variants), against independent expectations:
plain NumPy arithmetic, the inner transforms run on the sub-trees, or a pure-Python port of Keras' callback.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import kopt


def params_tree():
    return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.1]), "embed": jnp.array([1.0, 2.0, 3.0])}


def grads_sequence(n, seed=0, params=None):
    rng = np.random.default_rng(seed)
    params = params_tree() if params is None else params
    return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(n)]


def run(opt, grads, step_fn, params=None, **extra):
    params = params_tree() if params is None else params
    state = opt.init(params)
    for g in grads:
        updates, state = step_fn(g, state, params, **extra)
        params = kopt.apply_updates(params, updates)
    return params, state


def keras_plateau(values, factor, patience, min_delta, cooldown, min_lr, lr=1.0):
    """Keras 2's ReduceLROnPlateau.on_epoch_end (mode 'min'), one call per value; returns lr after each."""
    best, wait, cooldown_counter, out = np.inf, 0, 0, []
    for current in values:
        if cooldown_counter > 0:
            cooldown_counter -= 1
            wait = 0
        if current < best - min_delta:
            best, wait = current, 0
        elif not cooldown_counter > 0:
            wait += 1
            if wait >= patience and lr > min_lr:
                lr = max(lr * factor, min_lr)
                cooldown_counter, wait = cooldown, 0
        out.append(lr)
    return out


class TrainingLoopTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_equals_inner_on_the_subtree(self):
        opt = kopt.masked(kopt.Adam(lr=0.1), {"w": True, "b": False, "embed": True})
        grads = grads_sequence(4)
        params, state = run(opt, grads, self.variant(opt.update))
        inner = kopt.Adam(lr=0.1)
        sub = {"w": params_tree()["w"], "embed": params_tree()["embed"]}
        expected_sub, _ = run(inner, [{"w": g["w"], "embed": g["embed"]} for g in grads], inner.update, sub)
        chex.assert_trees_all_close(params["w"], expected_sub["w"], rtol=1e-6)
        chex.assert_trees_all_close(params["embed"], expected_sub["embed"], rtol=1e-6)
        # Masked-out leaves pass through unchanged (the raw gradient is the update) and hold no state.
        chex.assert_trees_all_close(params["b"], params_tree()["b"] + sum(g["b"] for g in grads), rtol=1e-6)
        self.assertIsNone(kopt.get_slot(state, "m")["b"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_partition_equals_each_transform_on_its_leaves(self):
        transforms = {"decayed": kopt.AdamW(lr=0.05, weight_decay=0.1), "plain": kopt.SGD(lr=0.2, momentum=0.5)}
        opt = kopt.partition(transforms, lambda p: {k: "plain" if k == "b" else "decayed" for k in p})
        grads = grads_sequence(4)
        params, state = run(opt, grads, self.variant(opt.update))
        decayed = {k: params_tree()[k] for k in ("w", "embed")}
        expected, _ = run(
            transforms["decayed"], [{k: g[k] for k in decayed} for g in grads], transforms["decayed"].update, decayed
        )
        expected_b, _ = run(
            transforms["plain"], [g["b"] for g in grads], transforms["plain"].update, params_tree()["b"]
        )
        chex.assert_trees_all_close({k: params[k] for k in decayed}, expected, rtol=1e-6)
        chex.assert_trees_all_close(params["b"], expected_b, rtol=1e-6)
        self.assertIsNone(kopt.get_slot(state.inner_states["plain"], "velocity")["w"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_skip_nonfinite_leaves_params_and_state_untouched(self):
        opt = kopt.skip_nonfinite(kopt.Adam(lr=0.1))
        grads = grads_sequence(6)
        poisoned = list(grads)
        poisoned[1] = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[1])
        poisoned[4] = {**grads[4], "b": grads[4]["b"].at[1].set(jnp.inf)}
        params, state = run(opt, poisoned, self.variant(opt.update))
        inner = kopt.Adam(lr=0.1)
        expected, expected_state = run(inner, [g for k, g in enumerate(grads) if k not in (1, 4)], inner.update)
        chex.assert_trees_all_close(params, expected, rtol=1e-6)
        self.assertEqual(int(state.skipped), 2)
        self.assertEqual(int(state.consecutive), 0)
        self.assertEqual(int(kopt.iterations(state)), 4)
        chex.assert_trees_all_close(kopt.get_slot(state, "v"), kopt.get_slot(expected_state, "v"), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_skip_nonfinite_lets_through_after_max_consecutive(self):
        opt = kopt.skip_nonfinite(kopt.SGD(lr=0.1), max_consecutive=2)
        nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params_tree())
        step = self.variant(opt.update)
        params, state = params_tree(), opt.init(params_tree())
        for k in range(3):
            updates, state = step(nan, state, params)
            params = kopt.apply_updates(params, updates)
            if k < 2:
                chex.assert_trees_all_equal(params, params_tree())
                self.assertEqual(int(state.consecutive), k + 1)
        self.assertTrue(bool(jnp.all(jnp.isnan(params["w"]))))
        self.assertEqual((int(state.skipped), int(state.consecutive)), (2, 0))

    @chex.variants(with_jit=True, without_jit=True)
    def test_accumulate_equals_one_step_on_the_mean_gradient(self):
        opt = kopt.accumulate(kopt.Adam(lr=0.1), every_k=3)
        grads = grads_sequence(6)
        step = self.variant(opt.update)
        params, state = params_tree(), opt.init(params_tree())
        for k, g in enumerate(grads):
            updates, state = step(g, state, params)
            if k % 3 != 2:
                chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
            params = kopt.apply_updates(params, updates)
        means = [jax.tree.map(lambda *gs: np.mean(np.stack(gs), axis=0), *grads[i : i + 3]) for i in (0, 3)]
        inner = kopt.Adam(lr=0.1)
        expected, expected_state = run(inner, means, inner.update)
        chex.assert_trees_all_close(params, expected, rtol=1e-5, atol=1e-7)
        self.assertEqual(int(kopt.iterations(state)), 2)
        chex.assert_trees_all_close(kopt.get_slot(state, "m"), kopt.get_slot(expected_state, "m"), rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_reduce_on_plateau_follows_keras_callback(self):
        values = [1.0, 0.9, 0.95, 0.9, 0.91, 0.92, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, np.nan, 0.6, 0.1, 0.2, 0.2, 0.2]
        config = {"factor": 0.5, "patience": 2, "min_delta": 0.01, "cooldown": 1, "min_scale": 0.1}
        opt = kopt.chain(kopt.SGD(lr=1.0), kopt.reduce_on_plateau(**config))
        expected = keras_plateau(
            values, config["factor"], config["patience"], config["min_delta"], config["cooldown"], 0.1
        )
        step = self.variant(opt.update)
        state = opt.init(jnp.zeros(2))
        for value, scale in zip(values, expected, strict=True):
            updates, state = step(jnp.ones(2), state, jnp.zeros(2), value=value)
            np.testing.assert_allclose(updates, [-scale, -scale], rtol=1e-6)
        self.assertLess(min(expected), 1.0)  # the sequence does trigger reductions

    @chex.variants(with_jit=True, without_jit=True)
    def test_lookahead_and_ema_match_numpy(self):
        lr, k, alpha, decay = 0.1, 3, 0.5, 0.9
        opt = kopt.chain(kopt.lookahead(kopt.SGD(lr=lr), sync_period=k, slow_step_size=alpha), kopt.ema_params(decay))
        grads = [jnp.asarray(g) for g in np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)]
        step = self.variant(opt.update)
        params, state = jnp.array([1.0, -1.0]), opt.init(jnp.array([1.0, -1.0]))
        fast, slow, ema = np.array([1.0, -1.0]), np.array([1.0, -1.0]), np.array([1.0, -1.0])
        for n, g in enumerate(grads, start=1):
            updates, state = step(g, state, params)
            params = kopt.apply_updates(params, updates)
            fast = fast - lr * np.asarray(g)
            if n % k == 0:
                slow = slow + alpha * (fast - slow)
                fast = slow.copy()
            ema = decay * ema + (1 - decay) * fast
            np.testing.assert_allclose(params, fast, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kopt.get_slot(state, "slow"), slow, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kopt.get_slot(state, "ema"), ema, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_add_decayed_weights_with_mask(self):
        opt = kopt.chain(kopt.add_decayed_weights(0.5, mask={"w": True, "b": False, "embed": False}))
        updates, _ = self.variant(opt.update)(
            jax.tree.map(jnp.zeros_like, params_tree()), opt.init(params_tree()), params_tree()
        )
        chex.assert_trees_all_close(updates["w"], 0.5 * params_tree()["w"])
        chex.assert_trees_all_equal(updates["b"], jnp.zeros(2))


def test_float32_params_with_bfloat16_state_halve_the_state_bytes():
    params = {"w": jnp.ones((64, 64)), "b": jnp.ones(64)}

    def slot_bytes(state):
        return sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim > 0)

    def total_bytes(state):
        return sum(x.nbytes for x in jax.tree.leaves(state))

    full, half = kopt.Adam().init(params), kopt.Adam(state_dtype="bfloat16").init(params)
    assert slot_bytes(half) * 2 == slot_bytes(full)
    assert total_bytes(half) / total_bytes(full) < 0.51
    for leaf in jax.tree.leaves(kopt.get_slot(half, "m")):
        assert leaf.dtype == jnp.bfloat16
    opt = kopt.Adam(lr=0.01, state_dtype="bfloat16")
    p, _ = run(opt, grads_sequence(3, params=params), jax.jit(opt.update), params)
    chex.assert_trees_all_equal_dtypes(p, params)
    assert float(p["w"][0, 0]) < 1.0


def test_bfloat16_params_train_with_float32_state():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params_tree())
    opt = kopt.Adam(lr=0.05, state_dtype="float32")
    p, state = run(opt, grads_sequence(3, params=params), jax.jit(opt.update), params)
    chex.assert_trees_all_equal_dtypes(p, params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(kopt.get_slot(state, "v")))
    assert not jnp.array_equal(p["w"], params["w"])


def test_state_dtype_is_validated_and_serialized():
    with np.testing.assert_raises_regex(ValueError, "state_dtype must be None or a floating dtype"):
        kopt.Adam(state_dtype="int32")
    config = kopt.serialize(kopt.SGD(momentum=0.9, state_dtype=jnp.bfloat16))
    assert config["config"]["state_dtype"] == "bfloat16"
    rebuilt = kopt.deserialize(config).init(jnp.ones(2))
    assert kopt.get_slot(rebuilt, "velocity").dtype == jnp.bfloat16


def test_adamw_by_name_and_config_and_validation():
    opt = kopt.get("AdamW")
    assert kopt.serialize(opt)["config"]["weight_decay"] == 0.004
    assert (
        kopt.serialize(kopt.deserialize(kopt.serialize(kopt.AdamW(weight_decay=0.1))))["config"]["weight_decay"] == 0.1
    )
    with np.testing.assert_raises_regex(ValueError, "weight_decay must be >= 0"):
        kopt.AdamW(weight_decay=-1.0)
    assert "weight_decay" in kopt.get_hyperparams(opt.init(jnp.ones(1)))


def test_wrapper_validation_and_missing_inputs():
    with np.testing.assert_raises_regex(ValueError, "every_k must be an integer >= 1"):
        kopt.accumulate(kopt.SGD(), 0)
    with np.testing.assert_raises_regex(ValueError, r"factor must be in \(0, 1\)"):
        kopt.reduce_on_plateau(factor=1.5)
    with np.testing.assert_raises_regex(ValueError, "needs the monitored value"):
        opt = kopt.reduce_on_plateau()
        opt.update(jnp.ones(1), opt.init(jnp.ones(1)))
    with np.testing.assert_raises_regex(ValueError, "needs the params"):
        opt = kopt.ema_params(0.9)
        opt.update(jnp.ones(1), opt.init(jnp.ones(1)))
    with np.testing.assert_raises_regex(ValueError, r"labels \['x'\] have no transform"):
        kopt.partition({"a": kopt.SGD()}, {"w": "a", "b": "x"}).init({"w": jnp.ones(1), "b": jnp.ones(1)})
    with np.testing.assert_raises_regex(ValueError, "patience must be a whole number"):
        opt = kopt.reduce_on_plateau()
        kopt.set_hyperparams(opt.init(jnp.ones(1)), patience=2.5)
