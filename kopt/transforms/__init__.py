"""The scaling transformations the Keras optimizers are built from, one module a family.

* :mod:`kopt.transforms.scaling`: the step as a whole (learning rate, loss-scale factor, weight decay,
  trust ratio);
* :mod:`kopt.transforms.momentum`: velocities (``trace``) and Lion's sign of momentum;
* :mod:`kopt.transforms.adaptive`: the adaptive rules of Keras 2 (RMSprop, Adagrad, Adadelta, Adam,
  Adamax, Nadam);
* :mod:`kopt.transforms.rate_holding`: the rules that hold the learning rate and read the params
  (Adafactor, schedule-free AdamW, FTRL).

Each transformation is one concept: its update rule for one array is a small
module-level function (``_adam_array``, ...), lifted to pytrees by
:func:`kopt.tree.map_arrays`; the scalars shared by all leaves (bias
corrections, schedules) are computed once per step. All numeric
hyperparameters are arrays in the state (see :mod:`kopt.state`); structural
options (``nesterov``, ``amsgrad``) are Python values. A hyperparameter given
as a JAX array (``optax.inject_hyperparams`` passes them so, traced under
``jit``) is read from the argument at every update instead, see
:func:`kopt.state.current_hyperparams`.

The per-array rules write a shared scalar as the first operand, outside the
array expression (``c * (m / (epsilon + sqrt(v)))``, ``epsilon + sqrt(a)``,
``weight_decay * p + g``). Under ``jit`` those scalars are runtime operands,
and XLA orders a fused kernel's operands by where it first met each one; with
the scalars first, every leaf of one shape gets the same kernel, which XLA
compiles once. Written the other way round, the first leaf of each shape got
a kernel of its own: per leaf, kopt compiled 1.2x slower than optax's
constant-folded Adam on 500 leaves of 83 shapes, and now compiles at its
speed (docs/performance.md).

Every transformation with per-parameter slots takes ``state_dtype=None``:
``None`` gives each slot its parameter's dtype, but at least float32 (so
bfloat16 params train with float32 state); a floating dtype such as
``"bfloat16"`` stores every slot in it (the math still runs in float32), which
halves the state of float32 params.

Symbols: ``g`` a gradient (or incoming update) leaf, ``i`` the number of steps
taken before this one, ``t = i + 1``.
"""

from kopt.transforms.adaptive import (
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByNadamState,
    ScaleByRmsState,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_nadam,
    scale_by_rms,
)
from kopt.transforms.momentum import ScaleByLionState, TraceState, scale_by_lion, trace
from kopt.transforms.rate_holding import (
    FtrlState,
    ScaleByAdafactorState,
    ScheduleFreeAdamState,
    ftrl,
    scale_by_adafactor,
    schedule_free_adam,
)
from kopt.transforms.scaling import (
    AddDecayedWeightsState,
    ScaleByLearningRateState,
    ScaleByTrustRatioState,
    UnscaleLossState,
    WeightDecayFirstState,
    add_decayed_weights,
    scale_by_learning_rate,
    scale_by_trust_ratio,
    unscale_loss,
    weight_decay_first,
)

__all__ = [
    "ScaleByLearningRateState",
    "scale_by_learning_rate",
    "UnscaleLossState",
    "unscale_loss",
    "AddDecayedWeightsState",
    "add_decayed_weights",
    "WeightDecayFirstState",
    "weight_decay_first",
    "ScaleByTrustRatioState",
    "scale_by_trust_ratio",
    "TraceState",
    "trace",
    "ScaleByLionState",
    "scale_by_lion",
    "ScaleByRmsState",
    "scale_by_rms",
    "ScaleByAdagradState",
    "scale_by_adagrad",
    "ScaleByAdadeltaState",
    "scale_by_adadelta",
    "ScaleByAdamState",
    "scale_by_adam",
    "ScaleByAdamaxState",
    "scale_by_adamax",
    "ScaleByNadamState",
    "scale_by_nadam",
    "ScaleByAdafactorState",
    "scale_by_adafactor",
    "ScheduleFreeAdamState",
    "schedule_free_adam",
    "FtrlState",
    "ftrl",
]
