"""Speaking Keras: configs, optimizer weights and saved files of every Keras kopt knows.

Three dialects share these readers and writers: Keras 2.2.4 (``kopt.Adam`` ...), TensorFlow's Keras
(``kopt.tf_keras``, legacy and TF >= 2.11 optimizers) and Keras 3 (``kopt.keras``). An optimizer built
by any of them knows its ``flavor``, which picks the meaning of config keys and the layout of weights.

* :mod:`kopt.keras_io.configs`: ``serialize`` / ``deserialize`` / ``get`` (configs, by name), and how a
  config's flavor is told;
* :mod:`kopt.keras_io.weights`: ``from_keras_weights`` / ``to_keras_weights`` (optimizer weights and
  variables in each Keras' layout);
* :mod:`kopt.keras_io.files`: ``load_keras_optimizer`` (``.h5`` and ``.keras`` files, read as hostile).

The public names are re-exported by :mod:`kopt`.
"""
