"""Internals of sharded variables on parameter servers (`tfpar/_compat/sharding.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/sharding.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import keras
import numpy as np
import tensorflow as tf

from tfpar._compat import sharding as _compat
from tfpar._subclass import swap_class


def test_sharded_variable_internals_differentiate_and_save_as_one_variable():
    from tensorflow.python.distribute import parameter_server_strategy as ps
    from tensorflow.python.distribute import parameter_server_strategy_v2 as ps2
    from tensorflow.python.distribute.sharded_variable import ShardedVariable

    # The methods the sharding subclass of the PS extended object overrides
    # or calls, and the class it extends.
    for name in (
        "_create_variable",
        "_update",
        "_select_single_value",
        "_local_results",
        "colocate_vars_with",
    ):
        assert hasattr(ps.ParameterServerStrategyExtended, name), name
    assert issubclass(
        _compat.TfparShardedExtended, ps2.ParameterServerStrategyV2Extended
    )
    table = np.arange(10 * 2, dtype="float32").reshape(10, 2)
    sharded = ShardedVariable([tf.Variable(table[:5]), tf.Variable(table[5:])])
    swap_class(
        sharded, "trainable_sharded_variable", _compat.TfparTrainableShardedVariable
    )
    variable = keras.Variable(np.zeros((10, 2), "float32"))
    variable._value = sharded  # how Keras wraps what the strategy created
    assert _compat.is_sharded(variable)
    with tf.GradientTape() as tape:
        rows = tf.nn.embedding_lookup(sharded, [1, 7, 7])
        loss = tf.reduce_sum(rows * [[1.0, 2.0]])
    grad = tape.gradient(loss, variable)  # Keras's call: one handle per variable
    assert isinstance(grad, tf.IndexedSlices)
    np.testing.assert_array_equal(
        tf.convert_to_tensor(grad).numpy()[[1, 7]], [[1.0, 2.0], [2.0, 4.0]]
    )
    np.testing.assert_array_equal(np.asarray(variable), table)
    saved = sharded._serialize_to_tensors()["VARIABLE_VALUE"]
    np.testing.assert_array_equal(saved.numpy(), table)
