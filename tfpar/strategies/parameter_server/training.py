"""Keras 3 `fit`/`evaluate`/`predict` through a `ClusterCoordinator`.

Keras 3 drives training with `model.train_function(iterator)`, once per
`steps_per_execution` steps, and reuses an existing `train_function` (the same
for `test_function` and `predict_function`). `ParameterServerStrategy` gives
each model built under it a `CoordinatedFunctions` object whose functions
schedule the work on the workers, through the strategy's
`ParameterServerRuntime`, instead of running it:

- training: each call schedules one function that runs `steps_per_execution`
  of Keras's own `train_step` on a worker, reading batches from that worker's
  copy of the dataset (`ClusterCoordinator.create_per_worker_dataset`), in
  the style of tf-keras 2 and TensorFlow's RFC 334. Steps run
  asynchronously; at most `max_in_flight` are queued ahead.
- training on a `keras.utils.PyDataset` or a Python generator: their
  elements come from Python objects of this process, so the coordinator
  reads each batch, in Keras's order, and sends it with the scheduled
  function (each exactly once); steps still run asynchronously.
- evaluation and prediction: the coordinator reads the batches and sends each
  to a worker (exactly once), so metrics and outputs are exact and in order.
- `model.get_metrics_result()` (which Keras calls at epoch end) first waits
  for every scheduled step, then reads the metric variables, which live on
  the parameter servers and so reflect all workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpar._compat import parameter_server as _compat
from tfpar.strategies.parameter_server.locking import lock_optimizer_updates
from tfpar.strategies.parameter_server.runtime import ParameterServerRuntime
from tfpar.strategies.parameter_server.sharding import prepare_sharded_model
from tfpar.strategies.parameter_server.watchdog import StepTracker


class KerasInput:
    """A dataset handed to Keras by `experimental_distribute_dataset`.

    Iterating it gives an `InputHandle`: Keras passes that to the train, test
    and predict functions, which either read batches on the coordinator or
    use the per-worker iterator.

    Args:
        runtime: The strategy's runtime.
        dataset: The `tf.data.Dataset` Keras built from the user's input.
        options: `tf.distribute.InputOptions` or `None`.
        epoch_iterator: The Keras epoch iterator that owns this input.
        from_python: Whether the elements come from Python objects of this
            process (a `PyDataset`, a generator): then training reads them
            here too, instead of each worker reading its own copy.
    """

    def __init__(
        self,
        runtime: ParameterServerRuntime,
        dataset: tf.data.Dataset,
        options: tf.distribute.InputOptions | None,
        epoch_iterator: Any,
        *,
        from_python: bool = False,
    ) -> None:
        self.runtime = runtime
        self.from_python = from_python
        self.dataset = dataset
        self.options = options
        self.epoch_iterator = epoch_iterator
        self._per_worker_iterator: Any = None
        self.steps_in_epoch = 0  # steps scheduled in the current epoch

    def __iter__(self) -> InputHandle:
        return InputHandle(self)

    def per_worker_iterator(self) -> Any:
        """Each worker's iterator over its own, endlessly repeated, copy."""
        if self._per_worker_iterator is None:
            self._per_worker_iterator = self.runtime.per_worker_iterator(
                self.dataset, self.options
            )
        return self._per_worker_iterator


class InputHandle(Iterator[Any]):
    """What Keras's epoch iterator yields to the step functions.

    `next()` reads a batch on the coordinator (Keras does so once to build
    the model, and tfpar for evaluation and prediction).
    """

    def __init__(self, source: KerasInput) -> None:
        self.source = source
        self._local: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._local is None:
            self._local = iter(self.source.dataset)
        return next(self._local)


class CoordinatedFunctions:
    """The train, test and predict functions of one model under the strategy.

    Args:
        model: The Keras model, built under the runtime's strategy.
        runtime: The strategy's runtime.
    """

    def __init__(self, model: keras.Model, runtime: ParameterServerRuntime) -> None:
        self.model = model
        self.runtime = runtime
        self.tracker: StepTracker = runtime.tracker
        self._original_get_metrics_result = model.get_metrics_result
        self._train_fn = tf.function(self._train_steps, reduce_retracing=True)
        self._train_batches_fn = tf.function(self._train_batches, reduce_retracing=True)
        self._test_fn = tf.function(self._test_steps, reduce_retracing=True)
        self._predict_fn = tf.function(self._predict_steps, reduce_retracing=True)
        self._metric_names: list[str] | None = None
        self._variables_checked = False
        # Names and shapes of the packed step results, recorded while tracing.
        self._layouts: dict[str, list[tuple[str, tuple[int, ...]]]] = {}

    def install(self) -> None:
        """Gives the model these functions (an instance attribute each).

        Only this model changes; Keras re-creates its own functions when the
        model is compiled again, and `install` is then called again.
        """
        self.model.train_function = self.train_function
        self.model.test_function = self.test_function
        self.model.predict_function = self.predict_function
        self.model.get_metrics_result = self.get_metrics_result

    def installed(self) -> bool:
        """Whether the model still uses these functions."""
        return getattr(self.model, "train_function", None) == self.train_function

    # What Keras calls.

    def train_function(self, handle: InputHandle) -> dict[str, Any]:
        """Schedules `steps_per_execution` training steps on some worker."""
        self._prepare_variables()
        self._current_logs()  # reads the metric names before scheduling
        source = handle.source
        epoch_steps = source.epoch_iterator.num_batches
        if source.from_python:
            # Keras's own epoch: until `steps_per_epoch`, the `PyDataset`'s
            # length or the generator's end (StopIteration ends it).
            batches = _take(handle, int(self.model.steps_per_execution))
            self.runtime.wait_for_room()
            self.runtime.schedule(self._train_batches_closure, (batches,))
            return self._current_logs()
        if not epoch_steps:
            raise ValueError(
                "Under tfpar.ParameterServerStrategy each worker reads its own "
                "copy of the data, so an epoch is a number of steps: pass "
                "`steps_per_epoch` to fit() for a dataset of unknown or "
                f"infinite length. Received: steps_per_epoch={epoch_steps!r}."
            )
        steps = min(
            int(self.model.steps_per_execution), epoch_steps - source.steps_in_epoch
        )
        source.steps_in_epoch = (source.steps_in_epoch + steps) % epoch_steps
        self.runtime.wait_for_room()
        iterator = source.per_worker_iterator()
        self.runtime.schedule(self._train_closure, (iterator, steps))
        return self._current_logs()

    def test_function(self, handle: InputHandle) -> dict[str, Any]:
        """Sends the next `steps_per_execution` batches to a worker."""
        self._prepare_variables()
        self._current_logs()  # reads the metric names before scheduling
        batches = _take(handle, int(self.model.steps_per_execution))
        self.runtime.wait_for_room()
        self.runtime.schedule(self._test_closure, (batches,))
        return self._current_logs()

    def predict_function(self, batches: list[Any]) -> Any:
        """Predicts `batches` on a worker and returns the outputs, in order."""
        self._prepare_variables()
        remote = self.runtime.schedule(self._predict_closure, (batches,))
        self.runtime.join()
        return remote.get()

    def get_metrics_result(self) -> dict[str, Any]:
        """Waits for every scheduled step, then returns the metric values."""
        if not tf.inside_function():  # Keras also calls it inside train_step
            self.runtime.join()
            self.tracker.latest_logs = None  # the next phase starts afresh
        return self._original_get_metrics_result()

    def _prepare_variables(self) -> None:
        # Workers update these variables concurrently: once the model, its
        # metrics and its optimizer are built, their updates must be atomic.
        if self._variables_checked:
            return
        model = self.model
        variables = list(model.variables)
        for metric in model.metrics:
            variables += metric.variables
        if model.optimizer is not None:
            variables += model.optimizer.variables
        _compat.make_updates_atomic(variables)
        if model.optimizer is not None:
            lock_optimizer_updates(model.optimizer)
        prepare_sharded_model(model, variables)
        self._variables_checked = True

    # What runs on the coordinator's worker threads.

    def _train_closure(self, iterator: Any, steps: int) -> None:
        run = self._closure_runner("train", steps)
        run(lambda: self._train_fn(iterator, steps))

    def _train_batches_closure(self, batches: list[Any]) -> None:
        run = self._closure_runner("train", len(batches))
        run(lambda: self._train_batches_fn(batches))

    def _test_closure(self, batches: list[Any]) -> None:
        run = self._closure_runner("test", 0)
        run(lambda: self._test_fn(batches))

    def _predict_closure(self, batches: list[Any]) -> Any:
        worker = _compat.current_worker_index()
        started = self.tracker.start(worker)
        try:
            outputs = self._predict_fn(batches)
            # Fetched here, under the step deadline: fetched later, a worker
            # frozen in between would block the main thread.
            values = tf.nest.map_structure(lambda t: t.numpy(), outputs)
        except BaseException:
            self.tracker.fail(worker)
            raise
        self.tracker.finish(worker, started, steps=0, device_seconds=None, logs=None)
        return values

    def _closure_runner(
        self, kind: str, steps: int
    ) -> Callable[[Callable[[], Any]], None]:
        def run(call: Callable[[], Any]) -> None:
            worker = _compat.current_worker_index()
            started = self.tracker.start(worker)
            try:
                packed = call()
                # Reading the results waits for the step, so the wall time and
                # the deadline cover the whole step. One tensor: one transfer.
                local, device_seconds = self._unpack(kind, packed.numpy())
            except BaseException:
                self.tracker.fail(worker)
                raise
            timed = device_seconds if kind == "train" else None
            self.tracker.finish(
                worker, started, steps=steps, device_seconds=timed, logs=local
            )

        return run

    # The step functions, traced once per shape and run on a worker. Their
    # Python bodies run only while tracing, before TensorFlow registers the
    # new function with every worker: each first checks that they answer.

    @tf.autograph.experimental.do_not_convert
    def _train_steps(self, iterator: Any, steps: int) -> tf.Tensor:
        self.runtime.before_new_functions()
        start = tf.timestamp()
        with tf.control_dependencies([start]):
            logs = self._run(self.model.train_step, next(iterator))
        if steps > 1:

            def body(i: tf.Tensor, _: Any) -> tuple[tf.Tensor, Any]:
                return i + 1, self._run(self.model.train_step, next(iterator))

            _, logs = tf.while_loop(
                lambda i, _: i < steps - 1, body, (tf.constant(0), logs)
            )
        with tf.control_dependencies(tf.nest.flatten(logs)):
            end = tf.timestamp()
        return self._pack("train", logs, end - start)

    @tf.autograph.experimental.do_not_convert
    def _train_batches(self, batches: list[Any]) -> tf.Tensor:
        return self._steps_in_order("train", self.model.train_step, batches)

    @tf.autograph.experimental.do_not_convert
    def _test_steps(self, batches: list[Any]) -> tf.Tensor:
        return self._steps_in_order("test", self.model.test_step, batches)

    def _steps_in_order(
        self, kind: str, step: Callable[[Any], Any], batches: list[Any]
    ) -> tf.Tensor:
        """`step` on each batch, one after the other; packed logs and time."""
        self.runtime.before_new_functions()
        start = tf.timestamp()
        logs: Any = None
        for batch in batches:
            deps = tf.nest.flatten(logs) if logs is not None else [start]
            with tf.control_dependencies(deps):
                logs = self._run(step, batch)
        with tf.control_dependencies(tf.nest.flatten(logs)):
            end = tf.timestamp()
        return self._pack(kind, logs, end - start)

    @tf.autograph.experimental.do_not_convert
    def _predict_steps(self, batches: list[Any]) -> Any:
        self.runtime.before_new_functions()
        outputs = [self._run(self.model.predict_step, batch) for batch in batches]
        if len(outputs) == 1:
            return outputs[0]
        return tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=0), *outputs)

    def _pack(self, kind: str, logs: dict[str, Any], seconds: tf.Tensor) -> tf.Tensor:
        """Packs the metric values and the step time into one float64 vector."""
        names = sorted(logs)
        self._layouts[kind] = [(name, tuple(logs[name].shape)) for name in names]
        parts = [tf.reshape(tf.cast(logs[name], tf.float64), [-1]) for name in names]
        return tf.concat([*parts, tf.reshape(seconds, [1])], axis=0)

    def _unpack(self, kind: str, flat: np.ndarray) -> tuple[dict[str, Any], float]:
        logs: dict[str, Any] = {}
        offset = 0
        for name, shape in self._layouts[kind]:
            size = int(np.prod(shape))
            value = flat[offset : offset + size]
            logs[name] = float(value[0]) if not shape else value.reshape(shape)
            offset += size
        return logs, float(flat[-1])

    def _run(self, step: Callable[[Any], Any], data: Any) -> Any:
        strategy = self.runtime.strategy
        with _compat.without_merge_call(strategy.extended):
            outputs = strategy.run(step, args=(data,))
        # One replica per worker: each value is that replica's tensor.
        return tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], outputs
        )

    def _current_logs(self) -> dict[str, Any]:
        """The metrics of the latest finished step, for the progress bar.

        Keras needs the metric names in the logs at epoch end; until a step
        of the current phase finished, their values are NaN. The names are
        read once, before anything is scheduled: reading variables on the
        parameter servers while TensorFlow recovers a worker can block.
        """
        if self._metric_names is None:
            self._metric_names = list(self._original_get_metrics_result())
        logs = self.tracker.latest_logs
        if logs is None or set(logs) != set(self._metric_names):
            return {name: float("nan") for name in self._metric_names}
        return logs


def _take(handle: InputHandle, count: int) -> list[Any]:
    """Reads up to `count` batches; raises `StopIteration` if there is none."""
    batches = []
    for _ in range(count):
        try:
            batches.append(next(handle))
        except (StopIteration, tf.errors.OutOfRangeError):
            break
    if not batches:
        raise StopIteration
    return batches
