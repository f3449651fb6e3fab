"""Keras variables and the TensorFlow variables behind them."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


def backing_variable(variable: Any) -> tf.Variable:
    """Returns the `tf.Variable` behind a Keras variable (or `variable` itself).

    Keras 3 wraps each `tf.Variable` (under a strategy, a distributed one) and
    exposes it as the public `Variable.value`.
    """
    return variable.value if isinstance(variable, keras.Variable) else variable
