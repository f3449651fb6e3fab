"""`tfpar.MultiWorkerMirroredStrategy`: synchronous data parallel across processes.

TensorFlow's collective runtime (one client per worker, ring all-reduce over
gRPC, NCCL between local GPUs) is the engine; the stock
`tf.distribute.MultiWorkerMirroredStrategy` fails under Keras 3 `fit`
(keras-team/keras issue 20585), because Keras calls `Strategy.reduce` in two
ways it rejects (`keras_reduce.py`). This subclass answers those calls, reads
`TF_CONFIG` through tfpar's reader and its errors, and reduces Keras's
gradients through the same `MeasuredAllReduce` as `tfpar.MirroredStrategy`
(compression, bucketing, the non-finite policy, `communication_stats()`),
wrapped around the strategy's own collective all-reduce.

A lost worker (killed, crashed or frozen) never hangs the others: TensorFlow's
coordination service (which the stock set-up starts) aborts every other
worker's collectives once the lost one misses its heartbeats, and the
strategy turns TensorFlow's error into a `tfpar.ClusterTaskError` naming the
task, its address and what to do. The error comes out of the model's
`train_function` (or `test_function`, `predict_function`), called by Keras;
the strategy wraps those of each model whose `fit`, `evaluate` or `predict`
asks it to distribute a dataset (Keras names no model, so the strategy finds
it on the stack, as `tfpar.ParameterServerStrategy` does). No Keras class
changes, and models trained elsewhere are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfpar._compat import keras_callers
from tfpar._compat import mirrored as compat
from tfpar._datasets import DistributesWithoutAutotuning
from tfpar._validation import check_choice, check_instance, check_number
from tfpar.devices import canonical_device
from tfpar.errors import ClusterTaskError
from tfpar.server import read_tf_config
from tfpar.stats import CommunicationStats
from tfpar.strategies.mirrored.all_reduce import MeasuredAllReduce
from tfpar.strategies.mirrored.keras_reduce import reduce_for_keras
from tfpar.strategies.mirrored.lost_workers import lost_task_error, name_lost_tasks
from tfpar.strategies.mirrored.options import AllReduceOptions
from tfpar.strategies.mirrored.replica_steps import TimesReplicaSteps

_IMPLEMENTATIONS = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}
# The jobs whose tasks train (TensorFlow's own rule: a "chief" trains too).
_TRAINING_JOBS = ("chief", "worker")


class MultiWorkerMirroredStrategy(
    TimesReplicaSteps,
    DistributesWithoutAutotuning,
    tf.distribute.MultiWorkerMirroredStrategy,
):
    """Synchronous data parallelism over the devices of several processes.

    Every worker runs the same script; each holds a copy of every variable,
    trains on its share of each global batch, and all-reduces the gradients
    with every other worker's (TensorFlow's collective ops: a ring over gRPC
    between processes, NCCL between a worker's GPUs), so every worker applies
    the same update. Keras 3's `fit`, `evaluate` and `predict` work unchanged
    (the stock class fails in `fit`). Create the strategy before anything
    else runs a TensorFlow op: collectives are configured when TensorFlow's
    runtime starts.

    The global batch is what the input pipeline yields (the `batch_size`
    given to `fit`, or a `tf.data` dataset's batch): TensorFlow's auto-shard
    policy gives each worker a share (by file with `FILE` sharding, else by
    element: each global batch is split evenly over all replicas of all
    workers), and the loss of each replica is scaled by the number of
    replicas, so the update equals one process training on the global batch.

    Args:
        cluster_resolver: A `tf.distribute.cluster_resolver.ClusterResolver`,
            or `None` (default) to read `TF_CONFIG` with tfpar's reader,
            whose errors say what is wrong (a missing `worker` job, an index
            out of range, an address without a port, ...).
        all_reduce: `"auto"` (default: NCCL between GPUs, ring otherwise),
            `"ring"` or `"nccl"`: TensorFlow's collective implementations.
        compression: `None` (default), `"fp16"` or `"bf16"`: float gradients
            are cast down for the all-reduce and back after it.
        bucket_bytes: `None` (default: one collective for all gradients, as
            stock, which starts once the last gradient exists) or a positive
            int: dense gradients of one dtype are packed into buckets of at
            most this many bytes, each its own collective, launched last
            layer first so that it overlaps the rest of the backward pass.
        on_nonfinite: `None` (default), `"skip"` or `"raise"`, decided on the
            reduced gradients, which every replica of every worker holds
            alike, so all of them agree.
        timeout: Seconds a collective may wait for the other workers before
            it fails, or `None` (default) for no limit. It also bounds a
            worker that stalls while its process still runs (a callback
            that never returns), which sends heartbeats.
        measure: Whether to time and count the reductions (default `True`).

    Fault tolerance: when one worker is lost (killed, crashed, or frozen,
    e.g. by SIGSTOP), the others stop within about 10 seconds (TensorFlow's
    coordination service's heartbeat timeout, measured 8 to 11 s on
    loopback; a killed worker 0, which hosts the service, is seen at once)
    with
    `tfpar.ClusterTaskError` (its `task` attribute, e.g.
    `"/job:worker/replica:0/task:1"`) and cannot continue: TensorFlow's
    collectives need every worker, and the runtime of each survivor is
    aborted. Restart every worker; with `keras.callbacks.BackupAndRestore`
    (every worker given its own `backup_dir`), the relaunch resumes at the
    start of the epoch that was interrupted, with the weights, optimizer
    state and step count of the last finished epoch. The task is named from
    TensorFlow's message: the coordination service lists the tasks that
    stopped sending heartbeats; a reset connection names its remote task;
    a missed heartbeat to the service names worker 0, which hosts it. A
    collective `timeout` names no task: the error then lists every other
    worker and its `task` is `None`.

    Raises:
        ValueError: If `TF_CONFIG` (with `cluster_resolver=None`) or the
            resolver's cluster is invalid, has no `worker` job, or names a
            task of another job; an option is not one of those allowed; or
            TensorFlow's runtime already started in this process. Keras's
            `fit` under the strategy raises it, before the first step, for a
            global batch size the number of replicas does not divide.
        TypeError: If an argument has the wrong type.

    Example:

    ```python
    # train.py, run on every worker, e.g. `tfpar launch --workers 2 -- python train.py`
    import keras
    import numpy as np
    import tfpar

    strategy = tfpar.MultiWorkerMirroredStrategy()  # reads TF_CONFIG
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((64, 4)), np.ones((64, 1)), batch_size=16, verbose=0)
    ```
    """

    def __init__(
        self,
        cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None = None,
        *,
        all_reduce: str = "auto",
        compression: str | None = None,
        bucket_bytes: int | None = None,
        on_nonfinite: str | None = None,
        timeout: float | None = None,
        measure: bool = True,
    ) -> None:
        check_choice("all_reduce", all_reduce, tuple(_IMPLEMENTATIONS))
        check_number("timeout", timeout, positive=True, unit="seconds", allow_none=True)
        options = AllReduceOptions(
            all_reduce="collective",
            compression=compression,
            bucket_bytes=bucket_bytes,
            on_nonfinite=on_nonfinite,
            measure=measure,
        )
        resolver = _resolver(cluster_resolver)
        if compat.runtime_started():
            raise ValueError(
                "tfpar.MultiWorkerMirroredStrategy must be created before "
                "TensorFlow runs its first op in this process: collective ops "
                "are configured when TensorFlow's runtime starts, and it already "
                "started. Create the strategy at the top of the script, before "
                "building models or datasets (tfpar.simulate_devices, if used, "
                "comes first)."
            )
        self._tfpar_all_reduce = all_reduce

        def measured(
            stock: tf.distribute.CrossDeviceOps,
            devices: tuple[str, ...],
            group_size: int,
        ) -> MeasuredAllReduce:
            # Made once TensorFlow knows this worker's replicas and their count.
            group = _group_devices(resolver.cluster_spec().as_dict(), devices)
            if len(group) != group_size:
                raise RuntimeError(
                    f"tfpar found {len(group)} replicas in the cluster, TensorFlow "
                    f"{group_size}: report this as a tfpar bug."
                )
            names = tuple(canonical_device(d) for d in devices)
            reducer = MeasuredAllReduce(names, options, group_devices=group)
            reducer.bind(stock, collective=True, replica_algorithm=stock)
            self._tfpar_reducer = reducer
            return reducer

        communication = tf.distribute.experimental.CommunicationOptions(
            implementation=_IMPLEMENTATIONS[all_reduce], timeout_seconds=timeout
        )
        compat.init_multi_worker(
            self,
            compat.TfparCollectiveExtended(
                self,
                resolver,
                communication,
                measured,
            ),
        )
        self._tfpar_cluster = {
            job: list(addresses)
            for job, addresses in resolver.cluster_spec().as_dict().items()
        }
        self._tfpar_workers = len(self._tfpar_cluster.get("chief", [])) + len(
            self._tfpar_cluster["worker"]
        )
        self._tfpar_task = (
            f"/job:{resolver.task_type}/replica:0/task:{resolver.task_id}"
        )

    def experimental_distribute_dataset(
        self,
        dataset: tf.data.Dataset,
        options: tf.distribute.InputOptions | None = None,
    ) -> Any:
        """Distributes `dataset`, as the stock method does.

        Called by Keras's `fit`, `evaluate` or `predict` of a model built
        under this strategy, it also gives that model step functions whose
        errors name a lost worker (`tfpar.ClusterTaskError`); TensorFlow's
        other errors pass unchanged. `fit` refuses a global batch size that
        the number of replicas does not divide. Keras's model build reads
        only shapes from the dataset, not a batch, so that a Python
        generator or a `keras.utils.PyDataset` trains on the same batches
        as in one process without a strategy (`tfpar/_keras_build.py`).

        Like every tfpar strategy's, the distributed dataset runs without
        tf.data's autotuning (`docs/multi_worker.md` says why).

        Args:
            dataset: A `tf.data.Dataset`.
            options: `tf.distribute.InputOptions` or `None`.

        Returns:
            The distributed dataset.

        Raises:
            ValueError: Called by Keras's `fit`, if the global batch size is
                known and the number of replicas does not divide it; called
                by Keras's `fit`, `evaluate` or `predict` on a
                `keras.utils.PyDataset` with `use_multiprocessing=True`.
        """
        caller = keras_callers.find_keras_caller(self)
        if caller is not None:
            if keras_callers.forks_data_workers(caller.epoch_iterator):
                raise ValueError(
                    f"tfpar.MultiWorkerMirroredStrategy cannot {caller.method} on "
                    "a keras.utils.PyDataset with use_multiprocessing=True: Keras "
                    "forks its data workers from a thread of this process, which "
                    "runs TensorFlow's collective gRPC runtime, and the forked "
                    "workers deadlock, so the process never exits. Use threads "
                    "(use_multiprocessing=False, workers=N) or a tf.data pipeline."
                )
            if caller.method == "fit":
                self._check_global_batch(
                    keras_callers.global_batch_size(caller.epoch_iterator, dataset)
                )
            name_lost_tasks(caller.model, self._lost_task_error)
        return super().experimental_distribute_dataset(dataset, options)

    def _check_global_batch(self, batch_size: int | None) -> None:
        """Refuses a global batch that the replicas cannot share evenly.

        TensorFlow would split it unevenly, and each replica's loss, scaled
        by the number of replicas, would weigh its samples differently from
        one process training on the whole batch.
        """
        replicas = self.num_replicas_in_sync
        if batch_size is None or batch_size % replicas == 0:
            return
        lower = batch_size - batch_size % replicas
        raise ValueError(
            f"The global batch size {batch_size} does not divide over the "
            f"{replicas} replicas of this cluster ({self._tfpar_workers} "
            f"workers of {replicas // self._tfpar_workers} replicas each): "
            "TensorFlow would give replicas batches of different sizes, which "
            "weigh their samples unequally. Use a multiple of "
            f"{replicas}, e.g. batch_size={lower or replicas} or "
            f"{lower + replicas}."
        )

    def _lost_task_error(self, error: tf.errors.OpError) -> ClusterTaskError | None:
        """`error` as a `ClusterTaskError` naming the lost task, or `None`."""
        return lost_task_error(error, self._tfpar_cluster, self._tfpar_task)

    @property
    def all_reduce_options(self) -> AllReduceOptions:
        """The validated `AllReduceOptions` of this strategy.

        Its `all_reduce` is `"collective"`; the implementation asked for
        (`"auto"`, `"ring"`, `"nccl"`) is `all_reduce_implementation`.
        """
        return self._tfpar_reducer.options

    @property
    def all_reduce_implementation(self) -> str:
        """The collective implementation asked for: `"auto"`, `"ring"` or `"nccl"`."""
        return self._tfpar_all_reduce

    def communication_stats(self) -> CommunicationStats:
        """Returns this worker's cumulative gradient all-reduce counters.

        As `tfpar.MirroredStrategy.communication_stats`, for this worker's
        replicas: the exposed reduction time, one replica's bytes before and
        after compression, and per local replica the time from its gradients
        being ready to its results being ready (which includes waiting for
        every other worker) and the bytes a ring of all replicas of all
        workers sends from each (modelled from the ring's routing). Each
        worker counts its own.

        Returns:
            A `tfpar.CommunicationStats` with `kind="allreduce"`.
        """
        return self._tfpar_reducer.stats()

    def reduce(self, reduce_op: Any, value: Any, axis: Any) -> Any:
        """Reduces `value` across every replica of every worker.

        As `tf.distribute.Strategy.reduce`, plus the two calls Keras 3 makes
        that the stock class rejects: the model build's eager average of the
        first batch (answered with this worker's first replica's batch, which
        has the shapes the build needs) and the average of scalar metrics
        over `axis=0` (reduced with `axis=None`).

        Args:
            reduce_op: A `tf.distribute.ReduceOp` or its name.
            value: The per-replica values (a nested structure).
            axis: `None`, or the axis to reduce within each replica's value.

        Returns:
            The reduced value, the same on every worker.
        """
        return reduce_for_keras(
            super().reduce, reduce_op, value, axis, self.num_replicas_in_sync
        )

    def skipped_steps(self) -> int:
        """Returns how many steps `on_nonfinite="skip"` skipped so far."""
        return self._tfpar_reducer.skipped_steps()


def _group_devices(cluster: Mapping[str, Any], devices: Sequence[str]) -> list[str]:
    """Every worker's replicas, in TensorFlow's task order (the chief first).

    Every worker has the same local devices as this one (TensorFlow's
    collectives need that), under its own job and task.
    """
    tasks = [("chief", i) for i in range(len(cluster.get("chief", [])))]
    tasks += [("worker", i) for i in range(len(cluster.get("worker", [])))]
    specs = [tf.DeviceSpec.from_string(d) for d in devices]
    return [
        canonical_device(spec.replace(job=job, replica=0, task=i).to_string())
        for job, i in tasks
        for spec in specs
    ]


def _resolver(
    cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None,
) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The given resolver, checked, or one made from `TF_CONFIG`."""
    if cluster_resolver is None:
        config = read_tf_config()
        cluster = {job: list(a) for job, a in config.cluster.items()}
        task_type, task_id = config.task_type, config.task_index
        # Every local GPU is a replica, as with TensorFlow's own TF_CONFIG
        # resolver (listing physical devices does not start the runtime).
        gpus = len(tf.config.list_physical_devices("GPU"))
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster),
            task_type=task_type,
            task_id=task_id,
            rpc_layer="grpc",
            num_accelerators={"GPU": gpus} if gpus else None,
        )
        where = "TF_CONFIG"
    else:
        check_instance(
            "cluster_resolver",
            cluster_resolver,
            tf.distribute.cluster_resolver.ClusterResolver,
            "a tf.distribute.cluster_resolver.ClusterResolver or None",
        )
        resolver = cluster_resolver
        cluster = resolver.cluster_spec().as_dict()
        task_type, task_id = resolver.task_type, resolver.task_id
        where = "the cluster resolver"
    if "worker" not in cluster:
        raise ValueError(
            f"The cluster of {where} has no 'worker' job, which holds the "
            f"tasks that train. Received jobs: {sorted(cluster)}. List every "
            'training process under "worker", e.g. {"worker": ["host0:2222", '
            '"host1:2222"]}.'
        )
    if task_type not in _TRAINING_JOBS:
        raise ValueError(
            f"This process's task ({task_type!r}, index {task_id}, from {where}) "
            f"is not a training task: MultiWorkerMirroredStrategy runs on the "
            f"tasks of the jobs {list(_TRAINING_JOBS)}. Received jobs: "
            f"{sorted(cluster)}."
        )
    return resolver
