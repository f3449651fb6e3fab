"""The parameter-server runtime of one `tfpar.ParameterServerStrategy`.

`ParameterServerRuntime` holds what the strategy's scheduled work runs on:
the `ClusterCoordinator` (created on first use), the `StepTracker` that
times each scheduled function and enforces the step deadline, the limit of
functions in flight and the per-worker dataset iterators. The strategy owns
one; the Keras glue (`training.py`) receives it, and needs nothing else from
the strategy.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar._compat import cluster as compat_cluster
from tfpar._compat import parameter_server as _compat
from tfpar.errors import StepDeadlineExceededError
from tfpar.strategies.parameter_server.watchdog import StepTracker

logger = logging.getLogger("tfpar")


class ParameterServerRuntime:
    """Schedules work on the workers of one parameter-server strategy.

    Args:
        strategy: The `tf.distribute.ParameterServerStrategy` whose variables
            and workers are used.
        tracker: The strategy's step bookkeeping and deadlines.
        max_in_flight: Scheduled functions that may wait or run at once.
        distribute_dataset: The strategy's stock
            `experimental_distribute_dataset`, for per-worker datasets.

    The strategy builds it; users read it as `strategy.runtime`, e.g. for
    the per-worker step records.

    Example:

    ```python
    strategy = tfpar.ParameterServerStrategy(cluster.cluster_resolver)
    model.fit(dataset, epochs=1, steps_per_epoch=20)
    print([record.steps for record in strategy.runtime.tracker.records])
    ```
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        tracker: StepTracker,
        max_in_flight: int,
        distribute_dataset: Callable[
            [tf.data.Dataset, tf.distribute.InputOptions | None], Any
        ],
    ) -> None:
        self.strategy = strategy
        self.tracker = tracker
        self.max_in_flight = max_in_flight
        self._distribute_dataset = distribute_dataset
        self._coordinator: tf.distribute.coordinator.ClusterCoordinator | None = None
        # By dataset object: reused by later fits on the same dataset.
        self._per_worker_iterators: weakref.WeakKeyDictionary[Any, Any] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def coordinator(self) -> tf.distribute.coordinator.ClusterCoordinator:
        """The strategy's `ClusterCoordinator`, created on first use."""
        if self._coordinator is None:
            coordinator = tf.distribute.coordinator.ClusterCoordinator(self.strategy)
            # Otherwise one frozen worker blocks every coordinator thread
            # between two closures, out of reach of the step deadline.
            compat_cluster.free_coordinator_threads(coordinator)
            self._coordinator = coordinator
        return self._coordinator

    def before_new_functions(self) -> None:
        """Raises if a new function's registration would wait forever.

        Call before anything that traces a function or builds per-worker
        resources: TensorFlow registers each new function with every worker
        while holding Python's GIL, so a frozen worker would stop every
        Python thread, the step deadline's included.

        Raises:
            StepDeadlineExceededError: Naming the workers whose servers do not
                answer within the step deadline (never without a deadline).
        """
        self.tracker.check_workers_answer()

    def wait_for_room(self) -> None:
        """Waits until fewer than `max_in_flight` functions are scheduled."""
        limit = self.max_in_flight
        self.tracker.wait(self.coordinator, lambda: self.tracker.in_flight < limit)

    def schedule(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Schedules a Python callable on some worker; returns its `RemoteValue`.

        `function` runs on a coordinator worker thread and must report to the
        tracker (`start`, then `finish` or `fail`).
        """
        coordinator = self.coordinator
        self.tracker.scheduled()
        return _compat.schedule_callable(coordinator, function, args)

    def join(self) -> None:
        """Waits for every scheduled function, with the step deadline."""
        self.tracker.join(self.coordinator)

    def settle(self) -> None:
        """Waits for the functions an interrupted call left scheduled.

        A `fit` stopped by an error on the coordinator (a callback's, an
        interrupt) returns with its functions still queued or running; the
        next call must neither see them in its step counts nor fail with
        their errors, which belong to the stopped call: they are logged.

        Raises:
            StepDeadlineExceededError: If they wait past the step deadline.
        """
        if self._coordinator is None or not self.tracker.in_flight:
            return
        try:
            self.join()
        except StepDeadlineExceededError:
            raise
        except Exception as err:  # the stopped call's, whatever it is
            logger.warning(
                "A function scheduled by an earlier, interrupted call failed "
                "after that call stopped: %s",
                err,
            )

    def per_worker_iterator(
        self, dataset: tf.data.Dataset, options: tf.distribute.InputOptions | None
    ) -> Any:
        """Each worker's iterator over its own, endlessly repeated, copy.

        Built once per dataset object and reused by later calls with it:
        building costs a dataset serialization and new functions registered
        with every worker (which a frozen worker would block).

        Args:
            dataset: The `tf.data.Dataset`.
            options: `tf.distribute.InputOptions` or `None`.

        Returns:
            A per-worker iterator, for a scheduled function's arguments.
        """
        with contextlib.suppress(TypeError):  # not weakly referenceable
            cached = self._per_worker_iterators.get(dataset)
            if cached is not None:
                return cached
        self.before_new_functions()
        # Workers read independently, so an epoch is a number of steps, not
        # one pass over the data: each copy repeats (as in tf-keras 2).
        distributed = self._distribute_dataset(dataset.repeat(), options)
        per_worker = self.coordinator.create_per_worker_dataset(distributed)
        iterator = iter(per_worker)
        with contextlib.suppress(TypeError):
            self._per_worker_iterators[dataset] = iterator
        return iterator
