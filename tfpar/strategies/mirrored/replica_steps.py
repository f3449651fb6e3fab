"""`TimesReplicaSteps`: each replica's step start, for its busy time.

A replica's busy time is the time from its step's inputs existing to its
gradients existing: the forward and backward pass. The gradients' moment is
measured by the all-reduce (`all_reduce.py`); the inputs' moment only where
the step begins, in `strategy.run`, which Keras calls once per step with
the step function. The mixin notes it there, on tfpar's own strategy
classes only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar.strategies.mirrored.all_reduce import MeasuredAllReduce


class TimesReplicaSteps:
    """Mixin for the mirrored strategies: notes each replica's step start.

    Listed before the stock base class. Eager `run` calls, and strategies
    built with `measure=False`, are left as they are.

    Example:

    ```python
    class MirroredStrategy(TimesReplicaSteps, tf.distribute.MirroredStrategy):
        ...  # sets self._tfpar_reducer, a MeasuredAllReduce, in __init__
    ```
    """

    _tfpar_reducer: MeasuredAllReduce

    def run(
        self,
        fn: Callable[..., Any],
        args: Any = (),
        kwargs: Any = None,
        options: Any = None,
    ) -> Any:
        """Runs `fn` on each replica, as `tf.distribute.Strategy.run`.

        While a step is traced, each replica also notes when its inputs
        exist, so that the step's gradient reduction counts its busy time.

        Args:
            fn: The function to run on each replica.
            args: Positional arguments for `fn`.
            kwargs: Keyword arguments for `fn`.
            options: `tf.distribute.RunOptions`, or `None`.

        Returns:
            The merged results of `fn` on every replica, as the stock method's.
        """
        reducer = self._tfpar_reducer
        if not tf.inside_function() or not reducer.options.measure:
            return super().run(fn, args, kwargs, options)  # type: ignore[misc]

        def timed(*a: Any, **k: Any) -> Any:
            reducer.note_step_start((a, k))
            return fn(*a, **k)

        return super().run(timed, args, kwargs, options)  # type: ignore[misc]
