"""Internals of `tfpar.PipelineStrategy` (`tfpar/_compat/pipeline.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/pipeline.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import keras
import tensorflow as tf

from tests._models import mlp
from tfpar._compat import pipeline as _compat


def test_compat_internals_exist() -> None:
    # Fails loudly when a TensorFlow or Keras upgrade removes what
    # PipelineStrategy's part of tfpar/_compat.py relies on.
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    assert _compat.keras_step(model.train_step) == (model, "train")
    assert _compat.keras_step(model.test_step) == (model, "test")
    assert isinstance(_compat.loss_tracker(model), keras.metrics.Mean)
    variable = model.get_layer("d0").kernel
    assert isinstance(variable.value, tf.Variable) and hasattr(variable, "_value")
    unique_id = variable.value._unique_id
    _compat.move_variable(variable, "/device:CPU:1")
    assert (
        variable.value.device.endswith("CPU:1")
        and variable.value._unique_id == unique_id
    )
    assert hasattr(_compat.OneDeviceExtended, "_call_for_each_replica")
    assert hasattr(_compat.OneDeviceExtended, "_update")
    dropout = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5)])
    assert _compat.seed_states(dropout) == [dropout.layers[0].seed_generator.state]
