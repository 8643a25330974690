"""Where Keras 3's own optimizers differ from kopt's (Keras 2) ones, in numbers.

    KERAS_BACKEND=jax python benchmarks/keras3_differences.py

Trains one small model (Dense 8 -> 16 tanh -> 1, MSE, 64 samples, batch 16,
5 epochs = 20 steps, no shuffling) from the same initial weights with
``kopt.to_keras3(kopt.X(**args))`` and with ``keras.optimizers.X(**same args)``,
then prints the largest weight difference and both final losses. The same
explicit hyperparameters go to both (their defaults differ as well: the table
lists them). Gradients are scaled up so that ``clipnorm`` bites.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

import kopt
import kopt.keras3

EPOCHS, BATCH = 5, 16
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 8)).astype(np.float32)
Y = (5.0 * np.sin(X @ rng.normal(size=(8, 1)))).astype(np.float32)

# (label, kopt arguments, Keras 3 arguments): the same rule in each one's spelling.
CASES = [
    ("SGD momentum 0.9, nesterov", "SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}, {}),
    ("SGD, decay 0.01 (Keras 3: none)", "SGD", {"lr": 0.01, "decay": 0.01}, None),
    ("RMSprop", "RMSprop", {"lr": 0.001}, {}),
    ("Adagrad", "Adagrad", {"lr": 0.01}, {}),
    ("Adadelta", "Adadelta", {"lr": 1.0}, {}),
    ("Adam", "Adam", {"lr": 0.001}, {}),
    ("Adam amsgrad", "Adam", {"lr": 0.001, "amsgrad": True}, {}),
    ("Adamax", "Adamax", {"lr": 0.002}, {}),
    ("Nadam", "Nadam", {"lr": 0.002}, {}),
    ("Adam clipnorm=1 (Keras 3: per variable)", "Adam", {"lr": 0.001, "clipnorm": 1.0}, {}),
    ("Adam clipnorm=1 vs Keras 3 global_clipnorm=1", "Adam", {"lr": 0.001, "clipnorm": 1.0}, {"global": True}),
]

KERAS3_NAMES = {"lr": "learning_rate"}


def keras3_optimizer(class_name: str, arguments: dict, options: dict):
    translated = {KERAS3_NAMES.get(k, k): v for k, v in arguments.items()}
    if options.get("global"):
        translated["global_clipnorm"] = translated.pop("clipnorm")
    if class_name != "SGD":
        translated.setdefault("epsilon", 1e-7)
    return getattr(keras.optimizers, class_name)(**translated)


def train(optimizer, initial):
    keras.backend.clear_session()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.set_weights(initial)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(X, Y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return [np.array(w) for w in model.get_weights()], history.history["loss"][-1]


def keras3_defaults(class_name: str) -> str:
    config = getattr(keras.optimizers, class_name)().get_config()
    keys = ("learning_rate", "momentum", "rho", "epsilon", "initial_accumulator_value", "beta_1", "beta_2")
    return ", ".join(f"{k}={config[k]:g}" for k in keys if k in config)


def main() -> None:
    keras.utils.set_random_seed(0)
    initial = [
        np.array(w)
        for w in keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)]).get_weights()
    ]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; {EPOCHS * len(X) // BATCH} steps\n")
    print("| optimizer, same arguments | max abs weight difference | final loss kopt | final loss Keras 3 |")
    print("| --- | --- | --- | --- |")
    for label, class_name, arguments, options in CASES:
        ours, our_loss = train(kopt.to_keras3(getattr(kopt, class_name)(**arguments)), initial)
        if options is None:  # Keras 3 has no decay: compare with the undecayed rate
            options, arguments = {}, {k: v for k, v in arguments.items() if k != "decay"}
        theirs, their_loss = train(keras3_optimizer(class_name, arguments, options), initial)
        difference = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs, strict=True))
        print(f"| {label} | {difference:.2e} | {our_loss:.5f} | {their_loss:.5f} |")
    print("\nDefaults of Keras 3's optimizers (kopt keeps Keras 2.2.4's):")
    for class_name in ("SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "Adamax", "Nadam"):
        print(f"- {class_name}: {keras3_defaults(class_name)}")


if __name__ == "__main__":
    main()
