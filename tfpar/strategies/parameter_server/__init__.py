"""Asynchronous training on parameter servers: `tfpar.ParameterServerStrategy`.

- `strategy`: the strategy, a subclass of
  `tf.distribute.ParameterServerStrategy`, and `ParameterServerOptions`.
- `training`: the Keras glue, coordinator-aware train, test and predict
  functions for a model's `fit`, `evaluate` and `predict`.
- `watchdog`: step bookkeeping, deadlines and the errors of lost tasks.
- `locking`: a per-variable mutex around each optimizer update.
- `sharding`: `Embedding` lookups on variables sharded over the servers.
"""

from tfpar.strategies.parameter_server.strategy import (
    ParameterServerOptions,
    ParameterServerStrategy,
)

__all__ = ["ParameterServerOptions", "ParameterServerStrategy"]
