"""kopt: the Keras 2 optimizers as pure JAX gradient transformations.

The public API is exactly what this module names; everything else is private.
"""

from kopt.base import EmptyState, GradientTransformation, apply_updates, chain, identity
from kopt.clipping import ClipState, clip_by_global_norm, clip_by_norm, clip_by_value
from kopt.optimizers import SGD, Adadelta, Adagrad, Adam, Adamax, Nadam, Optimizer, RMSprop
from kopt.schedules import Schedule, constant_schedule, inverse_time_decay
from kopt.serialization import deserialize, get, serialize
from kopt.state import get_hyperparams, get_slot, iterations, set_hyperparams, slot_names
from kopt.transforms import (
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByNadamState,
    ScaleByRmsState,
    TraceState,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_nadam,
    scale_by_rms,
    trace,
)

__version__ = "0.1.0"

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
    "scale_by_nadam",
    "scale_by_learning_rate",
    # schedules
    "Schedule",
    "constant_schedule",
    "inverse_time_decay",
    # optimizers
    "Optimizer",
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "Adamax",
    "Nadam",
    # by name / config
    "get",
    "serialize",
    "deserialize",
    # state access
    "get_hyperparams",
    "set_hyperparams",
    "get_slot",
    "slot_names",
    "iterations",
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
]
