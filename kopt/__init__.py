"""kopt: the Keras 2 optimizers as pure JAX gradient transformations.

The public API is exactly what this module names; everything else is private.
``kopt.to_keras3`` (kopt inside Keras 3, :mod:`kopt.keras3`) is public too, but
imported on first use and left out of ``__all__``: Keras is an optional extra,
and ``from kopt import *`` must not need it.
"""

import typing as _typing

from kopt import keras, tf_keras
from kopt.averaging import EmaOverwriteState, EmaParamsState, LookaheadState, ema_overwrite, ema_params, lookahead
from kopt.base import EmptyState, GradientTransformation, apply_updates, chain, identity
from kopt.checkpoint import CheckpointCorruptedError, load_state, read_checkpoint_header, save_state
from kopt.clipping import ClipState, clip_by_global_norm, clip_by_norm, clip_by_value
from kopt.groups import MaskedState, PartitionState, masked, partition
from kopt.keras_io.configs import deserialize, get, keras_variable_path, serialize
from kopt.keras_io.files import KerasFileError, load_keras_optimizer
from kopt.keras_io.weights import from_keras_weights, to_keras_weights
from kopt.optimizers import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Nadam, Optimizer, RMSprop
from kopt.orthogonal import OrthogonalizeByNewtonSchulzState, orthogonalize_by_newton_schulz
from kopt.packing import PackedArrays, PackedState, packed
from kopt.plateau import ReduceOnPlateauState, reduce_on_plateau
from kopt.schedules import (
    Schedule,
    constant_schedule,
    cosine_decay,
    exponential_decay,
    inverse_time_decay,
    join_schedules,
    linear_warmup,
    piecewise_constant,
    polynomial_decay,
)
from kopt.sharding import init_shardings, state_shardings
from kopt.state import get_hyperparams, get_slot, iterations, set_hyperparams, set_slot, slot_names
from kopt.training import train_step
from kopt.transforms import (
    AddDecayedWeightsState,
    FtrlState,
    ScaleByAdadeltaState,
    ScaleByAdafactorState,
    ScaleByAdagradState,
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByNadamState,
    ScaleByRmsState,
    ScaleByTrustRatioState,
    ScheduleFreeAdamState,
    TraceState,
    UnscaleLossState,
    WeightDecayFirstState,
    add_decayed_weights,
    ftrl,
    scale_by_adadelta,
    scale_by_adafactor,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_rms,
    scale_by_trust_ratio,
    schedule_free_adam,
    trace,
    unscale_loss,
    weight_decay_first,
)
from kopt.wrappers import (
    AccumulateState,
    DynamicLossScaleState,
    SkipNonfiniteState,
    accumulate,
    dynamic_loss_scale,
    skip_nonfinite,
)

__version__ = "0.1.0"

#: Public names imported on first use (their modules need an optional extra): not in ``__all__``.
_LAZY = ("to_keras3",)

if _typing.TYPE_CHECKING:
    # Type checkers see the lazily imported names with their own types (and no module __getattr__, which
    # would make them accept any name as kopt's).
    from kopt.keras3 import to_keras3 as to_keras3
else:

    def __getattr__(name: str):
        # kopt.to_keras3 imports Keras (an optional extra) only when it is used.
        if name == "to_keras3":
            from kopt.keras3 import to_keras3

            return to_keras3
        raise AttributeError(f"module 'kopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    # dir(kopt) (and so a notebook's tab completion) lists the lazily imported names too.
    return sorted({*globals(), *_LAZY})


__all__ = [
    # protocol
    "GradientTransformation",
    "EmptyState",
    "chain",
    "identity",
    "apply_updates",
    # transforms
    "clip_by_value",
    "clip_by_norm",
    "clip_by_global_norm",
    "trace",
    "scale_by_rms",
    "scale_by_adagrad",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_lion",
    "orthogonalize_by_newton_schulz",
    "ftrl",
    "unscale_loss",
    "weight_decay_first",
    "dynamic_loss_scale",
    "scale_by_trust_ratio",
    "scale_by_adafactor",
    "schedule_free_adam",
    "scale_by_nadam",
    "scale_by_learning_rate",
    "add_decayed_weights",
    "reduce_on_plateau",
    "ema_params",
    "ema_overwrite",
    # wrappers
    "masked",
    "partition",
    "skip_nonfinite",
    "accumulate",
    "lookahead",
    "packed",
    # schedules
    "Schedule",
    "constant_schedule",
    "inverse_time_decay",
    "exponential_decay",
    "piecewise_constant",
    "polynomial_decay",
    "cosine_decay",
    "linear_warmup",
    "join_schedules",
    # optimizers
    "Optimizer",
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "Adamax",
    "Nadam",
    "AdamW",
    # by name / config
    "get",
    "serialize",
    "deserialize",
    "keras_variable_path",
    "tf_keras",
    "keras",
    # state access
    "get_hyperparams",
    "set_hyperparams",
    "get_slot",
    "set_slot",
    "slot_names",
    "iterations",
    # training
    "train_step",
    # sharding
    "init_shardings",
    "state_shardings",
    # checkpoints and Keras weights
    "save_state",
    "load_state",
    "read_checkpoint_header",
    "CheckpointCorruptedError",
    "from_keras_weights",
    "to_keras_weights",
    "load_keras_optimizer",
    "KerasFileError",
    # state types
    "ClipState",
    "ScaleByLearningRateState",
    "TraceState",
    "ScaleByRmsState",
    "ScaleByAdagradState",
    "ScaleByAdadeltaState",
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByNadamState",
    "AddDecayedWeightsState",
    "ReduceOnPlateauState",
    "EmaParamsState",
    "EmaOverwriteState",
    "FtrlState",
    "UnscaleLossState",
    "WeightDecayFirstState",
    "DynamicLossScaleState",
    "ScaleByTrustRatioState",
    "OrthogonalizeByNewtonSchulzState",
    "ScaleByAdafactorState",
    "ScheduleFreeAdamState",
    "MaskedState",
    "PartitionState",
    "SkipNonfiniteState",
    "AccumulateState",
    "LookaheadState",
    "PackedState",
    "PackedArrays",
]
