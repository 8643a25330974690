"""Plain NumPy reference implementation of the seven Keras 2.2.4 optimizers.

Written from ``../shared/keras2_semantics.md`` alone, independently of (and without
looking at) the ``kopt`` package, so that tests can compare kopt against it.

Numerics emulate Keras with floatx = ``dtype``: the variable-backed hyperparameters
(``lr``, ``decay``, ``momentum``, RMSprop's ``rho``, ``beta_1``, ``beta_2``) are held as
``dtype`` scalars, while Python constants (epsilon, Adadelta's rho, schedule_decay,
literals such as 1.0, 0.5, 0.96) stay Python floats and are converted to ``dtype``
where they meet a ``dtype`` value -- which is exactly NumPy 2's (NEP 50) promotion rule.
Expressions are written in Keras' evaluation order (spec §11). Two deliberate kopt
extensions of the spec (§13) are followed: ``decay`` is always live, and
``set_value('decay', ...)`` works even on an optimizer built with ``decay=0``.

Each optimizer has ``step(params, grads) -> new params``, ``set_value(name, value)``,
``iterations`` and ``slots()``; ``make(name, dtype, **config)`` builds one by name.
"""

from __future__ import annotations

import numpy as np

if int(np.__version__.split(".")[0]) < 2:  # NumPy 1 would promote float32 scalar arithmetic to float64
    raise ImportError("tests/reference.py relies on NumPy >= 2 (NEP 50) promotion rules")

__all__ = ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam", "make"]


class _Optimizer:
    """Shared bookkeeping: dtype casting, gradient clipping, decay, iterations, slots."""

    _variables: tuple[str, ...] = ("lr", "decay")  # variable-backed hyperparameters (set_value-able)
    _slot_names: tuple[str, ...] = ()
    _has_decay = True

    def __init__(self, clipnorm=None, clipvalue=None, dtype=np.float32, **variables):
        self.dtype = np.dtype(dtype).type
        if not issubclass(self.dtype, np.floating):
            raise TypeError(f"dtype must be a floating type, got {dtype!r}")
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        for name, value in variables.items():
            setattr(self, name, self.dtype(value))
        self.iterations = 0
        self._slots: dict[str, list[np.ndarray]] | None = None

    def set_value(self, name: str, value: float) -> None:
        """Like ``K.set_value`` on a hyperparameter variable; takes effect at the next step."""
        if name not in self._variables:
            raise ValueError(f"{type(self).__name__} has no variable hyperparameter {name!r}")
        setattr(self, name, self.dtype(value))

    def slots(self) -> dict[str, list[np.ndarray]]:
        """Copies of the per-leaf state (empty lists before the first step)."""
        if self._slots is None:
            return {name: [] for name in self._slot_names}
        return {name: [a.copy() for a in arrays] for name, arrays in self._slots.items()}

    def _clip(self, grads: list[np.ndarray]) -> list[np.ndarray]:
        """§1: global-norm clipping (measured on the raw gradients), then value clipping."""
        if self.clipnorm is not None and self.clipnorm > 0:
            total = self.dtype(0)
            for g in grads:
                total = total + np.sum(np.square(g))
            norm = np.sqrt(total)
            if norm >= self.clipnorm:  # N == 0 never gets here, so no 0/0
                grads = [(self.clipnorm / norm) * g for g in grads]
        if self.clipvalue is not None and self.clipvalue > 0:
            limit = self.dtype(self.clipvalue)
            grads = [np.clip(g, -limit, limit) for g in grads]
        return grads

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> list[np.ndarray]:
        """One optimizer step; returns new params (inputs are not mutated) and updates the state."""
        if len(params) != len(grads):
            raise ValueError(f"{len(params)} params but {len(grads)} grads")
        params = [np.asarray(p, dtype=self.dtype) for p in params]
        grads = self._clip([np.asarray(g, dtype=self.dtype) for g in grads])
        if self._slots is None:
            self._slots = {name: [np.zeros_like(p) for p in params] for name in self._slot_names}
        i = self.dtype(self.iterations)  # OLD iteration count, in floatx
        lr_i = self.lr * (1.0 / (1.0 + self.decay * i)) if self._has_decay else self.lr
        scalars = self._scalars(i, lr_i)
        new_params = []
        new_slots: dict[str, list[np.ndarray]] = {name: [] for name in self._slot_names}
        for k, (p, g) in enumerate(zip(params, grads, strict=True)):
            old = {name: self._slots[name][k] for name in self._slot_names}
            p_new, updated = self._leaf(p, g, old, scalars)
            new_params.append(np.asarray(p_new))
            for name in self._slot_names:
                new_slots[name].append(np.asarray(updated[name]))
        for a in new_params + [a for arrays in new_slots.values() for a in arrays]:
            assert a.dtype == self.dtype, f"silent promotion to {a.dtype}"
        # §0: everything is assigned together at the end of the step.
        self._slots = new_slots
        self._commit(scalars)
        self.iterations += 1
        return new_params

    def _scalars(self, i, lr_i) -> dict:
        """Per-step scalars shared by all leaves."""
        return {"lr": lr_i}

    def _commit(self, scalars: dict) -> None:
        """Assign non-slot state at the end of the step (Nadam's m_schedule)."""

    def _leaf(self, p, g, slots: dict, c: dict):
        raise NotImplementedError


class SGD(_Optimizer):
    """§2."""

    _variables = ("lr", "momentum", "decay")
    _slot_names = ("velocity",)

    def __init__(
        self, lr=0.01, momentum=0.0, decay=0.0, nesterov=False, clipnorm=None, clipvalue=None, dtype=np.float32
    ):
        super().__init__(clipnorm, clipvalue, dtype, lr=lr, momentum=momentum, decay=decay)
        self.nesterov = bool(nesterov)

    def _leaf(self, p, g, slots, c):
        v = self.momentum * slots["velocity"] - c["lr"] * g
        p_new = p + self.momentum * v - c["lr"] * g if self.nesterov else p + v  # nesterov uses the NEW v
        return p_new, {"velocity": v}


class RMSprop(_Optimizer):
    """§3. ``rho`` is a variable; ``1 - rho`` is computed in floatx."""

    _variables = ("lr", "rho", "decay")
    _slot_names = ("accumulator",)

    def __init__(self, lr=0.001, rho=0.9, epsilon=None, decay=0.0, clipnorm=None, clipvalue=None, dtype=np.float32):
        super().__init__(clipnorm, clipvalue, dtype, lr=lr, rho=rho, decay=decay)
        self.epsilon = 1e-7 if epsilon is None else epsilon

    def _leaf(self, p, g, slots, c):
        a = self.rho * slots["accumulator"] + (1.0 - self.rho) * np.square(g)
        p_new = p - c["lr"] * g / (np.sqrt(a) + self.epsilon)
        return p_new, {"accumulator": a}


class Adagrad(_Optimizer):
    """§4. Accumulator starts at zero."""

    _slot_names = ("accumulator",)

    def __init__(self, lr=0.01, epsilon=None, decay=0.0, clipnorm=None, clipvalue=None, dtype=np.float32):
        super().__init__(clipnorm, clipvalue, dtype, lr=lr, decay=decay)
        self.epsilon = 1e-7 if epsilon is None else epsilon

    def _leaf(self, p, g, slots, c):
        a = slots["accumulator"] + np.square(g)
        p_new = p - c["lr"] * g / (np.sqrt(a) + self.epsilon)
        return p_new, {"accumulator": a}


class Adadelta(_Optimizer):
    """§5. ``rho`` is a Python constant; ``1 - rho`` is formed in double precision."""

    _slot_names = ("accumulator", "delta_accumulator")

    def __init__(self, lr=1.0, rho=0.95, epsilon=None, decay=0.0, clipnorm=None, clipvalue=None, dtype=np.float32):
        super().__init__(clipnorm, clipvalue, dtype, lr=lr, decay=decay)
        self.rho = rho
        self.epsilon = 1e-7 if epsilon is None else epsilon

    def _leaf(self, p, g, slots, c):
        one_minus_rho = 1.0 - self.rho  # Python float arithmetic, rounded to floatx when it meets g**2
        d = slots["delta_accumulator"]
        a = self.rho * slots["accumulator"] + one_minus_rho * np.square(g)
        u = g * np.sqrt(d + self.epsilon) / np.sqrt(a + self.epsilon)  # NEW a, OLD d
        p_new = p - c["lr"] * u
        d_new = self.rho * d + one_minus_rho * np.square(u)
        return p_new, {"accumulator": a, "delta_accumulator": d_new}


class Adam(_Optimizer):
    """§6. Bias correction folded into the step size; epsilon added to sqrt of the raw v."""

    _variables = ("lr", "beta_1", "beta_2", "decay")

    def __init__(
        self,
        lr=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=None,
        decay=0.0,
        amsgrad=False,
        clipnorm=None,
        clipvalue=None,
        dtype=np.float32,
    ):
        super().__init__(clipnorm, clipvalue, dtype, lr=lr, beta_1=beta_1, beta_2=beta_2, decay=decay)
        self.epsilon = 1e-7 if epsilon is None else epsilon
        self.amsgrad = bool(amsgrad)
        self._slot_names = ("m", "v", "vhat") if self.amsgrad else ("m", "v")

    def _scalars(self, i, lr_i):
        t = i + 1
        return {"lr_t": lr_i * (np.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t))}

    def _leaf(self, p, g, slots, c):
        m = self.beta_1 * slots["m"] + (1.0 - self.beta_1) * g
        v = self.beta_2 * slots["v"] + (1.0 - self.beta_2) * np.square(g)
        new = {"m": m, "v": v}
        if self.amsgrad:
            new["vhat"] = np.maximum(slots["vhat"], v)
            p_new = p - c["lr_t"] * m / (np.sqrt(new["vhat"]) + self.epsilon)
        else:
            p_new = p - c["lr_t"] * m / (np.sqrt(v) + self.epsilon)
        return p_new, new


class AdamW(Adam):
    """kopt's AdamW (issue 4): Adam plus ``- lr_i * weight_decay * p`` with the decayed, uncorrected lr."""

    def __init__(self, *args, weight_decay=0.004, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_decay = self.dtype(weight_decay)

    def _scalars(self, i, lr_i):
        return {**super()._scalars(i, lr_i), "lr_i": lr_i}

    def _leaf(self, p, g, slots, c):
        p_adam, new = super()._leaf(p, g, slots, c)
        return p_adam - c["lr_i"] * self.weight_decay * p, new


class Adamax(_Optimizer):
    """§7. Infinity-norm variant; epsilon added to u."""

    _variables = ("lr", "beta_1", "beta_2", "decay")
    _slot_names = ("m", "u")

    def __init__(
        self,
        lr=0.002,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=None,
        decay=0.0,
        clipnorm=None,
        clipvalue=None,
        dtype=np.float32,
    ):
        super().__init__(clipnorm, clipvalue, dtype, lr=lr, beta_1=beta_1, beta_2=beta_2, decay=decay)
        self.epsilon = 1e-7 if epsilon is None else epsilon

    def _scalars(self, i, lr_i):
        return {"lr_t": lr_i / (1.0 - self.beta_1 ** (i + 1))}

    def _leaf(self, p, g, slots, c):
        m = self.beta_1 * slots["m"] + (1.0 - self.beta_1) * g
        u = np.maximum(self.beta_2 * slots["u"], np.abs(g))
        p_new = p - c["lr_t"] * m / (u + self.epsilon)
        return p_new, {"m": m, "u": u}


class Nadam(_Optimizer):
    """§8. No decay; momentum schedule product ``m_schedule`` carried in floatx, starting at 1."""

    _variables = ("lr", "beta_1", "beta_2")
    _slot_names = ("m", "v")
    _has_decay = False

    def __init__(
        self,
        lr=0.002,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=None,
        schedule_decay=0.004,
        clipnorm=None,
        clipvalue=None,
        dtype=np.float32,
    ):
        super().__init__(clipnorm, clipvalue, dtype, lr=lr, beta_1=beta_1, beta_2=beta_2)
        self.epsilon = 1e-7 if epsilon is None else epsilon
        self.schedule_decay = schedule_decay
        self.m_schedule = self.dtype(1.0)

    def _scalars(self, i, lr_i):
        t = i + 1
        base = self.dtype(0.96)  # cast to floatx before the power
        mu_t = self.beta_1 * (1.0 - 0.5 * base ** (t * self.schedule_decay))
        mu_next = self.beta_1 * (1.0 - 0.5 * base ** ((t + 1) * self.schedule_decay))
        m_new = self.m_schedule * mu_t
        m_next = m_new * mu_next  # (M * mu_t) * mu_next
        return {"lr": lr_i, "t": t, "mu_t": mu_t, "mu_next": mu_next, "M_new": m_new, "M_next": m_next}

    def _commit(self, scalars):
        self.m_schedule = scalars["M_new"]

    def _leaf(self, p, g, slots, c):
        g_hat = g / (1.0 - c["M_new"])
        m = self.beta_1 * slots["m"] + (1.0 - self.beta_1) * g
        m_hat = m / (1.0 - c["M_next"])
        v = self.beta_2 * slots["v"] + (1.0 - self.beta_2) * np.square(g)
        v_hat = v / (1.0 - self.beta_2 ** c["t"])
        m_bar = (1.0 - c["mu_t"]) * g_hat + c["mu_next"] * m_hat
        p_new = p - c["lr"] * m_bar / (np.sqrt(v_hat) + self.epsilon)
        return p_new, {"m": m, "v": v}


_CLASSES = {cls.__name__.lower(): cls for cls in (SGD, RMSprop, Adagrad, Adadelta, Adam, AdamW, Adamax, Nadam)}


def make(name: str, dtype=np.float32, **config) -> _Optimizer:
    """Build a reference optimizer by (case-insensitive) name, e.g. ``make('adam', lr=0.01)``."""
    try:
        cls = _CLASSES[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown optimizer: {name}") from None
    return cls(dtype=dtype, **config)
