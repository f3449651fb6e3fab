"""`tfpar.ParameterServerStrategy`: Keras 3 `model.fit` on TensorFlow's PS runtime.

Keras 3 has no parameter-server path: under the stock
`tf.distribute.ParameterServerStrategy`, `model.fit` fails with "To use this
dataset, you need to pass this dataset to
ClusterCoordinator.create_per_worker_dataset". This subclass keeps
TensorFlow's runtime (`tf.distribute.Server` tasks over gRPC, variables on the
parameter servers, a `ClusterCoordinator` dispatching steps to workers) and
adds what Keras lost: `fit`, `evaluate` and `predict` schedule their steps on
the workers (`training.py`) through the strategy's `ParameterServerRuntime`
(`runtime.py`), waits have a step deadline (`watchdog.py`), and bad clusters
fail early with clear errors.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfpar._compat import keras_callers
from tfpar._compat import parameter_server as _compat
from tfpar._compat import sharding as compat_sharding
from tfpar._validation import check_instance, check_int, check_number
from tfpar.cluster import collect_before_joining
from tfpar.server import SECURITY_WARNING, read_tf_config, validate_cluster_spec
from tfpar.stats import CommunicationStats, DeviceCommunication
from tfpar.strategies.parameter_server.runtime import ParameterServerRuntime
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
        check_number(
            "connect_timeout", self.connect_timeout, positive=True, unit="seconds"
        )
        check_number(
            "step_deadline",
            self.step_deadline,
            positive=True,
            unit="seconds",
            allow_none=True,
        )
        check_int("max_in_flight", self.max_in_flight, minimum=1, allow_none=True)


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
            _check_tf_config_jobs()
            cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        check_instance(
            "cluster_resolver",
            cluster_resolver,
            tf.distribute.cluster_resolver.ClusterResolver,
            "a tf.distribute.cluster_resolver.ClusterResolver or None",
        )
        check_instance(
            "variable_partitioner",
            variable_partitioner,
            (Callable, type(None)),  # type: ignore[arg-type]
            "a partitioner (a callable, e.g. tf.distribute.experimental."
            "partitioners.MinSizePartitioner) or None",
        )
        cluster = _checked_cluster(cluster_resolver.cluster_spec().as_dict())
        _wait_until_reachable(cluster, options.connect_timeout)
        logger.warning(SECURITY_WARNING)
        collect_before_joining()  # joins the cluster next
        super().__init__(cluster_resolver, variable_partitioner)
        _compat.use_tfpar_extended(self.extended)
        if variable_partitioner is not None:
            compat_sharding.support_sharded_variables(self.extended)
        self.options = options
        tracker = StepTracker(
            cluster["worker"],
            options.step_deadline,
            {
                f"/job:{job}/replica:0/task:{i}": address
                for job, addresses in cluster.items()
                for i, address in enumerate(addresses)
            },
        )
        # What `fit`, `evaluate` and `predict` schedule their steps with.
        self.runtime = ParameterServerRuntime(
            self,
            tracker,
            # The default keeps each worker's queue non-empty between dispatches.
            max_in_flight or 4 * len(cluster["worker"]),
            super().experimental_distribute_dataset,
        )
        self._functions: weakref.WeakKeyDictionary[Any, CoordinatedFunctions] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def cluster_resolver(self) -> tf.distribute.cluster_resolver.ClusterResolver:
        """The cluster resolver this strategy was built from.

        The stock class keeps it but answers `None` here (its base class's
        default); tfpar's answers it, as the multi-worker strategies do, so
        callbacks find the cluster (and a `tfpar.LocalCluster`'s profiler
        services).
        """
        return self._cluster_resolver

    @property
    def coordinator(self) -> tf.distribute.coordinator.ClusterCoordinator:
        """The strategy's `ClusterCoordinator`, created on first use."""
        return self.runtime.coordinator

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
        caller = keras_callers.find_keras_caller(self)
        if caller is None:
            return super().experimental_distribute_dataset(dataset, options)
        model, epoch_iterator, _ = caller
        # Keras calls this first in each fit, evaluate or predict (and
        # within fit, for validation, once the epoch's steps finished).
        self.runtime.settle()
        # Earlier calls' functions are garbage now: collected here, while no
        # step runs. TensorFlow removes a collected function from every task;
        # a collection that fell inside a coordinator thread building
        # per-worker iterators made that removal wait 5 to 80 s (the
        # compatibility matrix's 12th fit, 3 of 4 runs; once past a 60 s
        # step deadline).
        gc.collect()
        functions = self._functions.get(model)
        if functions is None:
            functions = CoordinatedFunctions(model, self.runtime)
            self._functions[model] = functions
        if not functions.installed():
            functions.install()
        return KerasInput(
            self.runtime,
            dataset,
            options,
            epoch_iterator,
            from_python=_compat.feeds_python_data(epoch_iterator),
        )

    def communication_stats(self) -> CommunicationStats:
        """Returns cumulative per-worker step counters (`kind="parameter_server"`).

        Communication time is not measured: TensorFlow runs the reads and
        updates of variables on the parameter servers as ops inside each
        step, so without a profiler trace they cannot be told apart from
        computation (see docs/parameter_server.md); `comm_seconds` stays 0.
        Per worker, of its training functions only:

        - `busy_seconds`: the time they ran, measured in the graph on the
          worker (`tf.timestamp()` at the first and last op): computation
          plus the reads and updates on the parameter servers the ops wait
          for;
        - `dispatch_seconds`: the rest of their wall time as the
          coordinator saw it, from scheduling to results back: dispatching
          the function, moving inputs and results between coordinator and
          worker, queueing in the RPC layer. A coordinator clock and a
          worker clock are compared, so a function shorter than their
          jitter can add a few microseconds below zero.

        Returns:
            A `tfpar.CommunicationStats`: `steps` (training steps finished),
            `calls` (scheduled functions finished, evaluation and prediction
            included), and one `DeviceCommunication` per worker.
        """
        records = list(self.runtime.tracker.records)
        devices = tuple(
            DeviceCommunication(
                device=f"/job:worker/replica:0/task:{i}/device:CPU:0",
                busy_seconds=r.device_seconds,
                dispatch_seconds=r.wall_seconds - r.device_seconds,
            )
            for i, r in enumerate(records)
        )
        return CommunicationStats(
            kind="parameter_server",
            steps=sum(r.steps for r in records),
            counters=("busy_seconds", "dispatch_seconds"),
            calls=sum(r.closures for r in records),
            devices=devices,
        )


# What each job that parameter-server training needs does, for errors.
_REQUIRED_JOBS = {
    "ps": "the parameter servers, which hold the variables",
    "worker": "the workers, which run the training steps",
}


def _check_jobs(cluster: Mapping[str, Any], source: str) -> None:
    """Raises if the cluster lacks a `ps` or a `worker` job, saying what it has."""
    for job, role in _REQUIRED_JOBS.items():
        if not cluster.get(job):
            raise ValueError(
                f"ParameterServerStrategy needs a {job!r} job in its cluster "
                f"({role}), but {source} has "
                + (f"no {job!r} task" if job in cluster else f"no {job!r} job")
                + f": its jobs are {sorted(cluster)}. Add the addresses of the "
                f'{job} tasks, e.g. "{job}": ["host:port", ...], to {source}. '
                f"Received: cluster={dict(cluster)!r}."
            )


def _check_tf_config_jobs() -> None:
    """Validates `TF_CONFIG` with clear errors, a missing job's first.

    `read_tf_config` reports a task whose type is not a job of the cluster,
    which is what a cluster without its `ps` (or `worker`) job looks like to
    a parameter server (or a worker): this says which job is missing.
    """
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "null")
    except json.JSONDecodeError:
        config = None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    task_type = task.get("type") if isinstance(task, dict) else None
    if isinstance(cluster, dict) and task_type not in cluster:
        _check_jobs(cluster, "TF_CONFIG's cluster")
    read_tf_config()  # clear errors before TensorFlow's own
    if isinstance(cluster, dict):  # always, once read_tf_config passed
        _check_jobs(cluster, "TF_CONFIG's cluster")


def _checked_cluster(spec: Mapping[str, Any]) -> dict[str, list[str]]:
    """Validates a cluster spec dict for parameter-server training."""
    cluster: dict[str, list[str]] = {}
    for job, tasks in spec.items():
        # A sparse spec (dict of index to address) is read in index order.
        cluster[job] = (
            [tasks[i] for i in sorted(tasks)] if isinstance(tasks, dict) else tasks
        )
    _check_jobs(cluster, "the cluster resolver's cluster spec")
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
