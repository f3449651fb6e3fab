"""`tfpar.ParameterServerStrategy`: Keras 3 `model.fit` on TensorFlow's PS runtime.

Keras 3 has no parameter-server path: under the stock
`tf.distribute.ParameterServerStrategy`, `model.fit` fails with "To use this
dataset, you need to pass this dataset to
ClusterCoordinator.create_per_worker_dataset". This subclass keeps
TensorFlow's runtime (`tf.distribute.Server` tasks over gRPC, variables on the
parameter servers, a `ClusterCoordinator` dispatching steps to workers) and
adds what Keras lost: `fit`, `evaluate` and `predict` schedule their steps on
the workers (`ps_training.py`), waits have a step deadline
(`ps_watchdog.py`), and bad clusters fail early with clear errors.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfpar._compat import cluster as compat_cluster
from tfpar._compat import parameter_server as _compat
from tfpar._compat import sharding as compat_sharding
from tfpar.server import SECURITY_WARNING, read_tf_config, validate_cluster_spec
from tfpar.stats import CommunicationStats, DeviceCommunication
from tfpar.strategies.parameter_server.training import CoordinatedFunctions, KerasInput
from tfpar.strategies.parameter_server.watchdog import StepTracker

logger = logging.getLogger("tfpar")

# Tasks that this process does not connect to as a client.
_CLIENT_JOBS = ("chief", "evaluator")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParameterServerOptions:
    """Options of `tfpar.ParameterServerStrategy`, validated on creation.

    Args:
        connect_timeout: Seconds to wait, at construction, for every worker
            and parameter server to accept a connection. Defaults to 30.
        step_deadline: Seconds a scheduled function may run on one worker
            before tfpar stops waiting and raises
            `StepDeadlineExceededError` naming the frozen worker, and
            seconds scheduled work may wait while no worker starts or
            finishes any; with a deadline, a worker whose server does not
            answer for that long also stops the registration of a new
            function (see docs/parameter_server.md, "Fault tolerance").
            `None` waits forever (TensorFlow's behaviour). Defaults to
            `None`.
        max_in_flight: Scheduled functions that may wait or run at once;
            `None` means 4 per worker. Defaults to `None`.

    Raises:
        ValueError: If a value is out of range.
        TypeError: If a value has the wrong type.
    """

    connect_timeout: float = 30.0
    step_deadline: float | None = None
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        _check_seconds("connect_timeout", self.connect_timeout)
        if self.step_deadline is not None:
            _check_seconds("step_deadline", self.step_deadline)
        limit = self.max_in_flight
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(
                f"Received: max_in_flight={limit!r} (must be None or an int >= 1)."
            )


class ParameterServerStrategy(tf.distribute.ParameterServerStrategy):
    """TensorFlow's parameter-server strategy, with Keras 3 `fit` support.

    Variables live on the parameter servers (`ps` tasks), partitioned over
    them by `variable_partitioner`; training steps run asynchronously on the
    `worker` tasks, dispatched by a `tf.distribute.coordinator.
    ClusterCoordinator` in this (the coordinator) process. Unchanged Keras 3
    code works: build and compile the model under `strategy.scope()`, then
    call `fit`, `evaluate` and `predict`. Models not built under this
    strategy are not affected, and custom training loops keep the stock
    behaviour (`coordinator.create_per_worker_dataset`, `schedule`).

    Under this strategy an epoch is a number of steps (`steps_per_epoch`, or
    the dataset's length) spread over the workers, each reading its own copy
    of the training data; `steps_per_execution` steps run per scheduled
    function (on one worker); the progress bar shows the metrics of the
    latest finished step (NaN until one finished) and the epoch logs
    (History) the metric values on
    the parameter servers once every step finished. Evaluation and
    prediction send each batch to one worker, exactly once.

    Security: TensorFlow's gRPC servers (this process's too) listen on all
    interfaces without authentication; tfpar logs a warning at construction.
    Run clusters on an isolated network only (see docs/parameter_server.md).

    Args:
        cluster_resolver: A `tf.distribute.cluster_resolver.ClusterResolver`
            naming at least one `worker` and one `ps` task, e.g.
            `tfpar.LocalCluster(...).cluster_resolver`. `None` reads
            `TF_CONFIG` (`TFConfigClusterResolver`, the convention of
            Kubeflow's TFJob). Defaults to `None`.
        variable_partitioner: A `tf.distribute.experimental.partitioners`
            partitioner, e.g. `MinSizePartitioner(max_shards=num_ps)`, to
            split large variables (embeddings) over the parameter servers;
            `None` keeps each variable whole. Defaults to `None`.
        connect_timeout: See `ParameterServerOptions`. Defaults to 30.
        step_deadline: See `ParameterServerOptions`. Defaults to `None`.
        max_in_flight: See `ParameterServerOptions`. Defaults to `None`.

    Raises:
        ValueError: If `TF_CONFIG` or the cluster spec is invalid (not JSON,
            no `ps` or no `worker` job, an unknown task, an address without a
            port or binding `0.0.0.0`), or an option is out of range; all
            before any connection.
        TypeError: If an argument has the wrong type.
        ConnectionError: If some tasks do not accept connections within
            `connect_timeout`; the message lists each one and its address.

    Example:

    ```python
    with tfpar.LocalCluster(num_workers=2, num_ps=1) as cluster:
        strategy = tfpar.ParameterServerStrategy(cluster.cluster_resolver)
        with strategy.scope():
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=32, epochs=2)
    ```
    """

    def __init__(
        self,
        cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None = None,
        variable_partitioner: Any = None,
        *,
        connect_timeout: float = 30.0,
        step_deadline: float | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        options = ParameterServerOptions(
            connect_timeout=connect_timeout,
            step_deadline=step_deadline,
            max_in_flight=max_in_flight,
        )
        if cluster_resolver is None:
            read_tf_config()  # clear errors before TensorFlow's own
            cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        elif not isinstance(
            cluster_resolver, tf.distribute.cluster_resolver.ClusterResolver
        ):
            raise TypeError(
                "`cluster_resolver` must be a tf.distribute.cluster_resolver."
                f"ClusterResolver or None. Received: cluster_resolver="
                f"{cluster_resolver!r} of type {type(cluster_resolver).__name__}."
            )
        if variable_partitioner is not None and not callable(variable_partitioner):
            raise TypeError(
                "`variable_partitioner` must be a partitioner (a callable, e.g. "
                "tf.distribute.experimental.partitioners.MinSizePartitioner) or "
                f"None. Received: variable_partitioner={variable_partitioner!r}."
            )
        cluster = _checked_cluster(cluster_resolver.cluster_spec().as_dict())
        # The default keeps each worker's queue non-empty between dispatches.
        self.max_in_flight = max_in_flight or 4 * len(cluster["worker"])
        _wait_until_reachable(cluster, options.connect_timeout)
        logger.warning(SECURITY_WARNING)
        super().__init__(cluster_resolver, variable_partitioner)
        if variable_partitioner is not None:
            compat_sharding.support_sharded_variables(self.extended)
        self.options = options
        self.tracker = StepTracker(
            cluster["worker"],
            options.step_deadline,
            {
                f"/job:{job}/replica:0/task:{i}": address
                for job, addresses in cluster.items()
                for i, address in enumerate(addresses)
            },
        )
        if options.step_deadline is not None:
            # TensorFlow registers each new function with every worker while
            # holding the GIL: probe the workers first, or a frozen one hangs
            # the whole process.
            compat_cluster.check_before_function_registration(
                self.tracker.check_workers_answer
            )
        self._functions: weakref.WeakKeyDictionary[Any, CoordinatedFunctions] = (
            weakref.WeakKeyDictionary()
        )
        self._coordinator: tf.distribute.coordinator.ClusterCoordinator | None = None
        # Per-worker iterators of the datasets Keras passed, reused across fits.
        self.per_worker_iterators: weakref.WeakKeyDictionary[Any, Any] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def coordinator(self) -> tf.distribute.coordinator.ClusterCoordinator:
        """The strategy's `ClusterCoordinator`, created on first use."""
        if self._coordinator is None:
            coordinator = tf.distribute.coordinator.ClusterCoordinator(self)
            # Otherwise one frozen worker blocks every coordinator thread
            # between two closures, out of reach of the step deadline.
            compat_cluster.free_coordinator_threads(coordinator)
            self._coordinator = coordinator
        return self._coordinator

    def experimental_distribute_dataset(
        self,
        dataset: tf.data.Dataset,
        options: tf.distribute.InputOptions | None = None,
    ) -> Any:
        """Distributes `dataset`; for Keras, in a form its steps can schedule.

        Called by Keras's `fit`, `evaluate` and `predict` of a model built
        under this strategy, it returns a tfpar input that feeds the
        coordinator-aware step functions; called from anywhere else, it is the
        stock method (pass the result to
        `ClusterCoordinator.create_per_worker_dataset`).

        Args:
            dataset: A `tf.data.Dataset`.
            options: `tf.distribute.InputOptions` or `None`.

        Returns:
            The distributed dataset.
        """
        caller = _compat.find_keras_caller(self)
        if caller is None:
            return super().experimental_distribute_dataset(dataset, options)
        model, epoch_iterator = caller
        functions = self._functions.get(model)
        if functions is None:
            functions = self._functions[model] = CoordinatedFunctions(model, self)
        if not functions.installed():
            functions.install()
        return KerasInput(self, dataset, options, epoch_iterator)

    def communication_stats(self) -> CommunicationStats:
        """Returns cumulative per-worker step counters (`kind="parameter_server"`).

        For each worker, `busy_seconds` is the time its step functions ran,
        measured in the graph on the worker (`tf.timestamp()` at the first
        and last op): computation plus the variable reads and updates on the
        parameter servers that the step's ops wait for. `comm_seconds` is
        the rest of each scheduled function's wall time as the coordinator
        saw it: dispatching the function, moving inputs and results between
        coordinator and worker, and queueing in the RPC layer. TensorFlow
        runs PS reads and updates as ops inside the step, so without a
        profiler trace they cannot be told apart from computation; see
        docs/parameter_server.md.

        Returns:
            A `tfpar.CommunicationStats`: `steps` (training steps finished),
            `calls` (scheduled functions finished), `comm_seconds`, and one
            `DeviceCommunication` per worker.
        """
        records = list(self.tracker.records)
        devices = tuple(
            DeviceCommunication(
                device=f"/job:worker/replica:0/task:{i}/device:CPU:0",
                busy_seconds=r.device_seconds,
                comm_seconds=max(r.wall_seconds - r.device_seconds, 0.0),
            )
            for i, r in enumerate(records)
        )
        return CommunicationStats(
            kind="parameter_server",
            steps=sum(r.steps for r in records),
            comm_seconds=sum(d.comm_seconds for d in devices),
            calls=sum(r.closures for r in records),
            devices=devices,
        )


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a number of seconds. Received: {name}={value!r} "
            f"of type {type(value).__name__}."
        )
    if not value > 0:
        raise ValueError(f"Received: {name}={value!r} (must be > 0 seconds).")


def _checked_cluster(spec: Mapping[str, Any]) -> dict[str, list[str]]:
    """Validates a cluster spec dict for parameter-server training."""
    cluster: dict[str, list[str]] = {}
    for job, tasks in spec.items():
        # A sparse spec (dict of index to address) is read in index order.
        cluster[job] = (
            [tasks[i] for i in sorted(tasks)] if isinstance(tasks, dict) else tasks
        )
    for job in ("ps", "worker"):
        if not cluster.get(job):
            raise ValueError(
                f"Parameter-server training needs at least one {job!r} task. "
                f"Received: cluster={cluster!r}."
            )
    validate_cluster_spec(cluster)
    return cluster


def _wait_until_reachable(cluster: Mapping[str, Sequence[str]], timeout: float) -> None:
    """Waits until every worker and PS accepts a TCP connection.

    TensorFlow's constructor waits forever for an unreachable task; a TCP
    connect per task, retried until `timeout`, turns that into an error that
    names each missing task.
    """
    pending = {
        f"/job:{job}/replica:0/task:{i}": address
        for job, addresses in cluster.items()
        if job not in _CLIENT_JOBS
        for i, address in enumerate(addresses)
    }
    deadline = time.monotonic() + timeout
    while True:
        for name, address in list(pending.items()):
            host, _, port = address.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), 1.0):
                    del pending[name]
            except OSError:
                pass
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if pending:
        listed = ", ".join(f"{name} at {address}" for name, address in pending.items())
        raise ConnectionError(
            f"No answer within connect_timeout={timeout}s from {len(pending)} "
            f"cluster task(s): {listed}. Start them (e.g. `tfpar server` with "
            "their TF_CONFIG), check the addresses and the firewall, or raise "
            "connect_timeout."
        )
