"""`PipelineStrategy`: pipelined model parallelism for ordinary Keras models.

The model is cut into a chain of stages (`partition.py`), one per device; each
stage's variables live on its device. Every training step splits the batch
into micro-batches (`microbatch.py`) and builds, inside Keras's own
`tf.function`, the forward and backward pass of every (stage, micro-batch)
pair under `tf.device` of its stage. The actions are created in the order of
the schedule (`schedules.py`) and the actions of each stage are chained with
control dependencies, so each device runs exactly the planned sequence while
TensorFlow's dataflow executor overlaps the devices. Besides the batch's
pieces, only the tensors crossing stage boundaries (activations forward,
their gradients back) move between devices. With the interleaved
schedule each stage holds several chunks of the model, chunk c on device
c % K, and the boundaries between chunks are the stage boundaries. With
several replicas per stage (`devices` as a list of lists), each replica group
runs its share of the micro-batches and each stage's weight gradients are
summed on its replica 0, which sends the others a copy of the stage's
weights at each step (`replicas.py`).

The host side (input pipeline, replica context, metrics) is a one-device
strategy on this process's CPU, reading batches through one plain iterator
(`host_input.py`); the pipeline replaces the body of
Keras's train, test and predict steps for Sequential and functional models.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from tfpar._clocks import UnorderedClock
from tfpar._compat import pipeline as compat
from tfpar._datasets import DistributesWithoutAutotuning, without_autotune_thread
from tfpar._validation import (
    check_bool,
    check_choice,
    check_instance,
    check_int,
    value_error,
)
from tfpar._variables import backing_variable
from tfpar.stats import CommunicationStats, DeviceCommunication
from tfpar.strategies.mirrored.codec import Codec
from tfpar.strategies.mirrored.nonfinite import NonFinitePolicy
from tfpar.strategies.mirrored.options import (
    COMPRESSION_CHOICES,
    ON_NONFINITE_CHOICES,
)
from tfpar.strategies.pipeline import microbatch
from tfpar.strategies.pipeline.engine import PipelineEngine
from tfpar.strategies.pipeline.host_input import HostDataset
from tfpar.strategies.pipeline.layer_graph import has_layer_graph
from tfpar.strategies.pipeline.memory import StageMemory, stage_memory
from tfpar.strategies.pipeline.partition import (
    Partition,
    check_partition,
    partition_model,
    valid_cut_points,
)
from tfpar.strategies.pipeline.replicas import (
    check_replica_count,
    check_replicable,
    resolve_stage_devices,
)
from tfpar.strategies.pipeline.schedules import (
    Schedule,
    check_chunks_per_device,
    get_schedule,
    validate_schedule_name,
)
from tfpar.strategies.pipeline.trace import StageCounters

_HOST = "/device:CPU:0"


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Validated options of a `PipelineStrategy`.

    Attributes:
        devices: Canonical device names, one per stage (its replica 0, which
            holds the stage's variables).
        num_microbatches: Micro-batches per batch, >= 1.
        schedule: `"gpipe"`, `"1f1b"` or `"interleaved"`.
        partition: `"auto"`, `"flops"`, `"params"` or a tuple of
            `len(devices) * chunks_per_device - 1` layer names.
        recompute: Whether backward passes recompute their chunk's forward.
        chunks_per_device: Model chunks per device, V: 1, or >= 2 with the
            interleaved schedule. Defaults to `1`.
        replicas: Per stage, the canonical names of its R replicas, replica 0
            (`devices[s]`) first. Defaults to `()`: one replica per stage.
        compression: `None`, `"fp16"` or `"bf16"`: the dtype in which replicas
            r > 0 send their summed float gradients to replica 0 (R > 1 only).
        bucket_bytes: `None` or the largest bucket, in bytes, into which
            replicas r > 0 pack their dense gradients (R > 1 only).
        on_nonfinite: `None`, `"skip"` or `"raise"`, decided once per step
            for every stage.
    """

    devices: tuple[str, ...]
    num_microbatches: int
    schedule: str
    partition: str | tuple[str, ...]
    recompute: bool
    chunks_per_device: int = 1
    replicas: tuple[tuple[str, ...], ...] = ()
    compression: str | None = None
    bucket_bytes: int | None = None
    on_nonfinite: str | None = None

    def __post_init__(self) -> None:
        microbatch.validate_num_microbatches(self.num_microbatches)
        check_choice("compression", self.compression, COMPRESSION_CHOICES)
        check_int("bucket_bytes", self.bucket_bytes, minimum=1, allow_none=True)
        check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE_CHOICES)
        if not self.replicas:
            object.__setattr__(self, "replicas", tuple((d,) for d in self.devices))
        for name in ("compression", "bucket_bytes"):
            value = getattr(self, name)
            if value is not None and self.num_replicas == 1:
                # Nothing would be compressed or packed: refused, not ignored.
                raise value_error(
                    name,
                    value,
                    "None when `devices` gives one replica per stage (it "
                    "applies to the gradients a stage's replicas r > 0 send "
                    "to replica 0; pass `devices` as one list of replicas "
                    "per stage)",
                )
        if tuple(r[0] for r in self.replicas) != self.devices:
            raise ValueError(
                "`replicas` must list each stage's devices with `devices[s]` "
                f"first. Received: devices={list(self.devices)!r}, "
                f"replicas={[list(r) for r in self.replicas]!r}."
            )
        check_replica_count(self.num_microbatches, self.num_replicas)
        validate_schedule_name(self.schedule)
        check_bool("recompute", self.recompute)
        check_int("chunks_per_device", self.chunks_per_device, minimum=1)
        check_chunks_per_device(
            self.chunks_per_device,
            schedule=self.schedule,
            num_stages=len(self.devices),
        )
        if isinstance(check_partition(self.partition), str):
            return
        num_chunks = len(self.devices) * self.chunks_per_device
        if len(self.partition) != num_chunks - 1:
            per_device = (
                f" x chunks_per_device={self.chunks_per_device}"
                if self.chunks_per_device > 1
                else ""
            )
            unit = "chunk" if self.chunks_per_device > 1 else "stage"
            raise ValueError(
                f"`partition` must name the first layer of every {unit} but the "
                f"first: {num_chunks - 1} name(s) for {len(self.devices)} "
                f"device(s){per_device}. Received: "
                f"partition={list(self.partition)!r} with "
                f"devices={list(self.devices)!r}."
            )

    @property
    def num_replicas(self) -> int:
        """Replicas per stage, R (1 unless `devices` was a list of lists)."""
        return len(self.replicas[0])


class PipelineStrategy(DistributesWithoutAutotuning, tf.distribute.Strategy):
    """Trains a Keras model cut into stages, one per device, with micro-batches.

    Wrap ordinary Keras code: build and compile the model under
    `strategy.scope()`, then `fit`, `evaluate` and `predict` work unchanged.
    On the first step the model is cut into `len(devices)` stages (see
    `partition_model`), each stage's variables (and their optimizer slots) are
    moved to its device, and every step runs micro-batches through the stages
    following the schedule, so that the devices work at the same time.

    For models without batch-dependent layers, the weights after N steps equal
    single-device training on the whole batches up to float rounding.
    `BatchNormalization` computes its statistics per micro-batch.

    Args:
        devices: One device per stage, local (`"/device:CPU:1"`, GPUs) or
            remote (`"/job:worker/replica:0/task:1/device:CPU:0"` after
            `LocalCluster.connect()`). Defaults to `None`:
            `tfpar.default_devices()`. Or, for pipeline x data parallel, one
            list per stage naming its R replicas (the same R for every
            stage): replica group r, `devices[0][r], ..., devices[K-1][r]`,
            runs micro-batches j with `j % R == r`, and each stage's weight
            gradients are summed on its replica 0, which holds its variables
            (see `docs/pipeline.md`, "Pipeline x data parallel").
        num_microbatches: Micro-batches per batch, M >= 1 (M >= R with
            replicas). Defaults to `4`.
            Batches that do not divide evenly get micro-batches differing by
            one example; a batch smaller than M is an error.
        schedule: `"1f1b"` (default; at most K micro-batches in flight per
            stage), `"gpipe"` (all forwards, then all backwards) or
            `"interleaved"` (1F1B over `chunks_per_device` chunks of the
            model per device, chunk c on device c % K: a smaller bubble,
            `(K - 1) / (V * M + K - 1)` planned when M >= K, for more
            transfers and about (K - 1) / V more stage activations held on
            the first device; see `docs/pipeline.md`).
        partition: `"auto"` (default) balances the stages' measured cost:
            each indivisible segment's forward and backward pass is timed on
            a sample micro-batch of 16 examples on the first device (counted
            FLOPs if a segment cannot run alone). `"flops"` balances counted
            forward FLOPs (no run: the same cut every time), `"params"`
            parameter counts. Or a list of `len(devices) - 1` layer names,
            each the first layer of a new stage (with the interleaved
            schedule, `len(devices) * chunks_per_device - 1` names, each the
            first layer of a new chunk).
        recompute: If `True`, a stage recomputes its forward pass during the
            backward pass instead of keeping activations. Defaults to `False`.
        chunks_per_device: Model chunks per device, V (Megatron-LM's virtual
            pipeline stages), keyword-only. Defaults to `None`: 2 with
            `schedule="interleaved"` (which needs V >= 2 and at least 2
            devices), else 1, the only value the other schedules accept.
        compression: With replicas, `None` (default), `"fp16"` or `"bf16"`,
            keyword-only: each replica r > 0 casts its summed float32/float64
            weight gradients down on its device, sends them to the stage's
            replica 0 and they are cast back there, halving the reduction's
            gradient bytes (as `tfpar.MirroredStrategy`'s option, whose
            code it reuses). Replica 0's own sums and the weights it sends
            stay exact.
        bucket_bytes: With replicas, `None` (default: one transfer per
            gradient) or a positive int, keyword-only: each replica r > 0
            packs its dense gradients of one dtype, in order, into buckets
            of at most this many bytes, one transfer each (as
            `tfpar.MirroredStrategy`'s option).
        on_nonfinite: `None` (default: no check), `"skip"` or `"raise"`,
            keyword-only: decided once per step on the gradients the
            optimizer is about to apply, every stage's together. `"skip"`
            applies zero gradients to every stage when any stage's hold a
            NaN or Inf, and counts the step in `skipped_steps()`; `"raise"`
            stops `fit` with an `InvalidArgumentError` naming the stages
            (their replica 0 devices) whose gradients were not finite.
            Refused with a `LossScaleOptimizer` (mixed precision), which
            skips overflowing steps itself and lowers its loss scale.

    Raises:
        ValueError: For an unknown schedule or `partition` name,
            `num_microbatches < 1` (or < R), unknown, malformed or repeated
            devices, stages with different replica counts, a
            `partition` list of the wrong length, `chunks_per_device` not
            fitting the schedule, `compression` or `bucket_bytes` without
            replicas, a value of `compression` or `on_nonfinite` not
            allowed; when the model is first partitioned: more
            stages (or chunks) than cut points, an unknown or invalid
            cut-point layer (the message names it).
        TypeError: For an argument of the wrong type (`partition=42`,
            `num_microbatches="4"`, `recompute=1`, `devices="/gpu:0"`,
            `chunks_per_device=2.0`, `devices` mixing names and lists).

    Example:

    ```python
    import tfpar
    tfpar.simulate_devices(2)
    import keras, numpy as np

    strategy = tfpar.PipelineStrategy(num_microbatches=4)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((8,))]
            + [keras.layers.Dense(32, activation="relu") for _ in range(4)]
            + [keras.layers.Dense(1)]
        )
        model.compile(optimizer="adam", loss="mse")
    print(strategy.partition_model(model))  # optional: partitions now
    x, y = np.random.rand(256, 8), np.random.rand(256, 1)
    model.fit(x, y, batch_size=32, epochs=2)
    print(strategy.communication_stats())
    ```
    """

    def __init__(
        self,
        devices: Sequence[str] | Sequence[Sequence[str]] | None = None,
        num_microbatches: int = 4,
        schedule: str = "1f1b",
        partition: str | Sequence[str] = "auto",
        recompute: bool = False,
        *,
        chunks_per_device: int | None = None,
        compression: str | None = None,
        bucket_bytes: int | None = None,
        on_nonfinite: str | None = None,
    ) -> None:
        replicas = resolve_stage_devices(devices)
        names = [stage[0] for stage in replicas]
        self._options = PipelineOptions(
            devices=tuple(names),
            replicas=replicas,
            num_microbatches=num_microbatches,
            schedule=validate_schedule_name(schedule),
            partition=check_partition(partition),
            recompute=recompute,
            chunks_per_device=check_chunks_per_device(
                chunks_per_device, schedule=schedule, num_stages=len(names)
            ),
            compression=compression,
            bucket_bytes=bucket_bytes,
            on_nonfinite=on_nonfinite,
        )
        self._schedule = get_schedule(
            schedule,
            num_stages=len(names),
            num_microbatches=num_microbatches,
            chunks_per_device=self._options.chunks_per_device,
        )
        # Input pipeline, metrics and counters stay on this process's CPU, which
        # also works when every stage is a remote worker or a GPU.
        with tf.init_scope(), tf.device(_HOST):
            self._counters = StageCounters(len(names) * len(replicas[0]))
        super().__init__(_PipelineExtended(self, _HOST))

    @property
    def options(self) -> PipelineOptions:
        """The validated options."""
        return self._options

    @property
    def schedule(self) -> Schedule:
        """The schedule of a step's M micro-batches (print it with `.format()`).

        With R replicas per stage, a step does not run this grid: replica
        group r runs the same schedule over its own micro-batches (j with
        j % R == r), about M / R of them, with the bubble of that smaller M.
        """
        return self._schedule

    def _distribute_without_autotune(
        self,
        dataset: tf.data.Dataset,
        options: tf.distribute.InputOptions | None,
    ) -> HostDataset:
        """Distributes `dataset` to the one replica: a plain iterator on the host.

        The stock one-device strategy reads through a `MultiDeviceIterator`,
        whose teardown can crash the process (`host_input.py`).
        """
        return HostDataset(dataset, _HOST, options)

    def distribute_datasets_from_function(
        self,
        dataset_fn: Any,
        options: tf.distribute.InputOptions | None = None,
    ) -> HostDataset:
        """Calls `dataset_fn` for the one input pipeline and distributes its dataset.

        Args:
            dataset_fn: A function taking a `tf.distribute.InputContext` (one
                input pipeline, one replica in sync) and returning a
                `tf.data.Dataset` of per-replica batches.
            options: `tf.distribute.InputOptions` or `None`.

        Returns:
            The distributed dataset, read through a plain iterator on the host.

        Raises:
            TypeError: If `dataset_fn` is not callable or does not return a
                `tf.data.Dataset`, or `options` has the wrong type.

        Example:

        ```python
        def dataset_fn(context):
            return tf.data.Dataset.range(8).batch(4)

        for batch in strategy.distribute_datasets_from_function(dataset_fn):
            strategy.run(step, args=(batch,))
        ```
        """
        if not callable(dataset_fn):
            raise TypeError(
                "`dataset_fn` must be a function taking a tf.distribute.InputContext "
                f"and returning a tf.data.Dataset. Received: {dataset_fn!r}."
            )
        dataset = dataset_fn(tf.distribute.InputContext())
        check_instance("dataset_fn()", dataset, tf.data.Dataset, "a tf.data.Dataset")
        return HostDataset(
            without_autotune_thread(dataset), _HOST, options, per_replica_allowed=True
        )

    def partition_model(self, model: keras.Model) -> Partition:
        """Cuts `model` into stages and places each stage's variables on its device.

        Runs automatically at the first step; call it earlier to inspect the
        partition. Repeated calls return the same partition. With the
        interleaved schedule the table has one row per chunk, K * V rows,
        chunk c on device c % K.

        Args:
            model: A built Sequential or functional model created under
                `scope()`.

        Returns:
            The partition table (print it).

        Raises:
            TypeError: If `model` is a subclassed model.
            ValueError: If it cannot be cut as asked (the message names the
                layer or the argument).
        """
        return self.extended.engine_for(model).partition

    def peak_in_flight(self) -> list[int]:
        """Returns, per stage, the most micro-batches whose activations it held.

        Measured from the step's timestamps (largest over all training steps so
        far), to compare with `schedule.peak_in_flight(stage)`: 1F1B holds at
        most K - s micro-batches on stage s, GPipe all M. The interleaved
        schedule counts (micro-batch, chunk) pairs, each about 1/V of a
        stage's activations.

        With replicas, a stage's count is the largest over its replicas
        (each runs its group's schedule of about M / R micro-batches).

        Returns:
            One count per stage (zeros before the first training step).
        """
        peak = self._counters.read()["peak"].reshape(len(self._options.devices), -1)
        return [int(v) for v in peak.max(axis=1)]

    def skipped_steps(self) -> int:
        """Returns how many steps `on_nonfinite="skip"` skipped so far.

        Counted in the step, once per training step whose gradients held a
        NaN or Inf on any stage (0 without `on_nonfinite="skip"`).

        Returns:
            The count over every `fit` of this strategy so far.

        Example:

        ```python
        strategy = tfpar.PipelineStrategy(on_nonfinite="skip")
        # ... model.fit(...) ...
        strategy.skipped_steps()  # 0 while every gradient was finite
        ```
        """
        return int(self._counters.skipped.numpy())

    def communication_stats(self) -> CommunicationStats:
        """Returns cumulative per-stage counters of the training steps so far.

        Each training step is measured from timestamps taken on every stage's
        device around each of its actions (forward or backward pass of one
        micro-batch). The step's span runs from the earliest start of any
        stage's first action to the latest end of any stage's last one; for
        every stage, the span divides into three disjoint parts: computing,
        waiting for a tensor its neighbour had already produced, and waiting
        for anything else.

        The timestamps are taken by ops that run after the tensor they mark
        exists, so they lag by the dataflow executor's scheduling; on
        several machines they assume synchronized clocks, and on GPUs they
        mark when kernels were enqueued, not when they finished.

        With R replicas per stage, there is one `DeviceCommunication` per
        device, K x R, stage-major (`devices[0][0], devices[0][1], ...`);
        the first four counters describe the device's own replica group's
        stage-boundary transfers, and the reduction among a stage's replicas
        is counted apart (see `docs/pipeline.md`, "Pipeline x data
        parallel"). The step's span then ends when the last stage's gradient
        totals exist, and the bubble also excludes `reduce_seconds`.

        Returns:
            A `CommunicationStats` with `kind="pipeline"` and one
            `DeviceCommunication` per stage (per device with replicas):

            - `busy_seconds`: time computing, summed over the stage's
              actions from their start to their end.
            - `comm_seconds`: exposed communication time, counted on the
              receiving stage. For each action that receives a tensor from
              a neighbour (a forward on stage s > 0 receives activations
              from s - 1, a backward on stage s < K - 1 the input gradient
              from s + 1; with the interleaved schedule, a forward on chunk
              c > 0 from chunk c - 1 and a backward on chunk c < K V - 1
              from chunk c + 1): `max(0, arrived - max(ready, free))`, where
              `ready` is when the tensor existed on the sender, `arrived`
              when the stage had it, and `free` the end of the stage's
              previous action (the step's start for its first). A tensor
              that arrived before the stage was free (or before it was
              ready, as timestamped) made nobody wait: it counts 0.
            - `idle_seconds`: the bubble, the step's span minus busy and
              exposed communication time: waiting for a neighbour still
              computing, or for the schedule.
            - `bytes_sent`: bytes of the tensors the stage sent, counted from
              their sizes: activations to the next stage and input gradients
              to the previous one.
            - `reduce_seconds` (R > 1 only): on a stage's replica 0, the
              exposed reduction, from the last replica's summed weight
              gradients being ready (the end of its last action) to the
              stage's totals existing on replica 0; on replica r > 0, the
              time its first action waited for its copy of the stage's
              weights beyond its input (and the step's start).
            - `reduce_bytes_sent` (R > 1 only), counted from the tensors'
              sizes: on replica 0, the copies of the stage's variables (and
              seed states) it sent to the other replicas; on replica r > 0,
              its summed weight gradients.
            - `wait_seconds` (R > 1 only): the time from the end of the
              device's last action of a step (its summed gradients ready)
              to the end of the last one among its stage's replicas: its
              wait at the stage's reduction, a part of `idle_seconds`.
            - `slowest_steps` (R > 1 only): steps at which the others waited
              for this device. A slow device makes its whole replica group
              late, so several stages' last replicas are one group's; of
              the stages' last replicas, the one whose busy time most
              exceeds its stage's other replicas' mean counts the step.

            With R > 1, each device's `replica_group` is its replica index r:
            the group that runs micro-batches j with `j % R == r`.

            The totals: `comm_seconds` is the mean over devices of their
            exposed communication time (plus `reduce_seconds`), so
            `comm_seconds / steps` is the exposed communication of an
            average stage per step, a part of the step's wall time;
            `bytes_logical` and `bytes_moved` are the bytes sent by all
            devices (reduction included); `calls` counts the transfers,
            `2 * M * (K - 1)` per step (`2 * M * (K * V - 1)` with V chunks
            per device), plus `2 * K * (R - 1)` with replicas (one copy and
            one gradient transfer per replica r > 0 and stage).
        """
        values = self._counters.read()
        names = [d for stage in self._options.replicas for d in stage]
        big_r = self._options.num_replicas
        devices = tuple(
            DeviceCommunication(
                device=device,
                busy_seconds=float(values["busy"][i]),
                idle_seconds=float(values["idle"][i]),
                comm_seconds=float(values["comm"][i]),
                bytes_sent=int(values["bytes"][i]),
                reduce_seconds=float(values["reduce"][i]),
                reduce_bytes_sent=int(values["reduce_bytes"][i]),
                wait_seconds=float(values["wait"][i]),
                slowest_steps=int(values["slowest"][i]),
                replica_group=i % big_r if big_r > 1 else None,
            )
            for i, device in enumerate(names)
        )
        total_bytes = sum(d.bytes_sent + d.reduce_bytes_sent for d in devices)
        counters: tuple[str, ...] = (
            "busy_seconds",
            "comm_seconds",
            "idle_seconds",
            "bytes_sent",
        )
        if self._options.num_replicas > 1:
            counters += (
                "reduce_seconds",
                "reduce_bytes_sent",
                "wait_seconds",
                "slowest_steps",
            )
        return CommunicationStats(
            kind="pipeline",
            steps=int(values["steps"]),
            comm_seconds=sum(d.comm_seconds + d.reduce_seconds for d in devices)
            / len(devices),
            calls=int(values["calls"]),
            bytes_logical=total_bytes,
            bytes_moved=total_bytes,
            devices=devices,
            counters=counters,
        )

    def activation_memory(
        self, model: keras.Model, batch_size: int
    ) -> list[StageMemory]:
        """Returns, per stage, the activation memory of training `model`.

        What a stage keeps for its backward passes is counted, for the largest
        micro-batch of a `batch_size` batch, from a traced (never run) forward
        and backward pass of each of its chunks: the tensors computed from
        the chunk's input that the backward pass reads, which TensorFlow's
        executor keeps until then. Each record has, per micro-batch, the
        bytes it keeps on the stage (counted); the micro-batches held at once
        (measured in the training steps so far, and planned: 1F1B K - s,
        GPipe M); the stage's modelled peak (1F1B keeps K micro-batches'
        activations where GPipe keeps M; `recompute=True` only their inputs,
        plus one micro-batch's activations during a backward pass); and the
        device allocator's measured peak, for local GPUs only (CPU devices
        share the host allocator). The loss's own tensors on the last stage
        and the gradients and temporaries of a running pass are not counted.
        A boundary tensor is counted on both stages; on logical CPU devices
        of one process both stages share its buffer. With R replicas per
        stage, each record is the stage's replica 0, which runs replica
        group 0's schedule over ceil(M / R) micro-batches (the most of any
        group): GPipe holds those, not M.

        Args:
            model: A model created under `scope()`; partitioned if it was not
                yet.
            batch_size: Examples per training batch, an int >= M.

        Returns:
            One `StageMemory` per stage (see
            `tfpar/strategies/pipeline/memory.py`).

        Raises:
            TypeError: If `batch_size` is not an int.
            ValueError: If `batch_size` is smaller than M, or the model
                cannot be partitioned (as `partition_model`).

        Example:

        ```python
        model.fit(x, y, batch_size=512, epochs=1)
        for stage in strategy.activation_memory(model, batch_size=512):
            print(stage.stage, stage.held_microbatches, stage.peak_activation_bytes)
        ```
        """
        engine = self.extended.engine_for(model)
        held = self.peak_in_flight()
        return stage_memory(
            chunks=engine.chunks,
            devices=self._options.devices,
            schedule=self._schedule,
            recompute=self._options.recompute,
            batch_size=batch_size,
            held_microbatches=held if any(held) else None,  # zeros: no step yet
            replica_schedule=engine.group_schedules[0],
        )


class _PipelineExtended(compat.OneDeviceAdapter):
    """A one-device extended whose `run` pipelines Keras steps over the stages."""

    def __init__(self, container: PipelineStrategy, host: str) -> None:
        super().__init__(container, host)
        self._pipeline = container
        self._engines: dict[int, PipelineEngine] = {}
        self._colocated: dict[Any, Any] = {}
        self._placing = False
        self._warned = False

    def engine_for(self, model: keras.Model) -> PipelineEngine:
        """Returns the model's engine, partitioning the model on first use."""
        engine = self._engines.get(id(model))
        if engine is None:
            # Eagerly, and inside the scope so that the moved variables belong
            # to the strategy (optimizer slots are colocated with them).
            with tf.init_scope(), self._pipeline.scope():
                engine = self._build_engine(model)
            self._engines[id(model)] = engine
        return engine

    def _build_engine(self, model: keras.Model) -> PipelineEngine:
        options = self._pipeline.options
        if getattr(model, "jit_compile", False) is True:
            raise ValueError(
                "PipelineStrategy places each stage on its own device, which XLA "
                "cannot compile as one cluster. Received: jit_compile=True in "
                "model.compile (pass jit_compile=False)."
            )
        # Chunk c runs on device c % K: consecutive chunks on different devices.
        chunk_devices = options.devices * options.chunks_per_device
        if options.chunks_per_device > 1 and isinstance(options.partition, str):
            _check_enough_cut_points(model, options)
        table, chunk_models = partition_model(model, chunk_devices, options.partition)
        microbatch.check_batch_statistics(model, options.num_microbatches)
        check_replicable(chunk_models, options.num_replicas)
        self._placing = True
        try:
            chunk_of = {}
            for c, chunk in enumerate(chunk_models):
                for variable in chunk.variables:
                    chunk_of[backing_variable(variable).ref()] = c
                    compat.move_variable(variable, chunk_devices[c])
            # Optimizer slots created before the partition follow their variable.
            optimizer = getattr(model, "optimizer", None)
            for variable in getattr(optimizer, "variables", []):
                key = backing_variable(variable).ref()
                reference = self._colocated.pop(key, None)
                if reference is not None and reference in chunk_of:
                    compat.move_variable(variable, chunk_devices[chunk_of[reference]])
            clocks = [
                [UnorderedClock(device) for device in stage]
                for stage in options.replicas
            ]
        finally:
            self._placing = False
        return PipelineEngine(
            model=model,
            chunks=chunk_models,
            partition=table,
            schedule=self._pipeline.schedule,
            recompute=options.recompute,
            counters=self._pipeline._counters,
            clocks=clocks,
            replicas=options.replicas,
            codec=Codec(options.compression, options.bucket_bytes),
            nonfinite=(
                NonFinitePolicy(
                    options.on_nonfinite,
                    options.devices,
                    owner="tfpar.PipelineStrategy",
                )
                if options.on_nonfinite is not None
                else None
            ),
        )

    def make_variable(self, next_creator: Any, **kwargs: Any) -> Any:
        """Creates a variable on the host; records whose slot it is, if any."""
        if self._placing:
            return next_creator(**kwargs)
        reference = kwargs.get("colocate_with")
        variable = super().make_variable(next_creator, **kwargs)
        if reference is not None:  # an optimizer slot: follows its variable
            self._colocated[variable.ref()] = reference.ref()
        return variable

    def run_replica_fn(self, fn: Any, args: Any, kwargs: Any) -> Any:
        """Pipelines Keras's own steps; runs any other function unsplit."""
        step = compat.keras_step(fn)
        if step is None:
            self._warn_unsplit(fn)
            return super().run_replica_fn(fn, args, kwargs)
        model, kind = step
        if kind != "train" and _runs_unsplit(model):
            self._warn_unsplit(fn)
            return super().run_replica_fn(fn, args, kwargs)
        engine = self.engine_for(model)
        return engine.step(kind, *args, **(kwargs or {}))

    def _warn_unsplit(self, fn: Any) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"PipelineStrategy runs {getattr(fn, '__name__', fn)!r} without "
            "pipelining: only Keras's own train_step, test_step and "
            "predict_step of Sequential and functional models are "
            "pipelined (a model overriding them runs unsplit, its ops on "
            "the first device).",
            stacklevel=4,  # past the adapter: the caller of strategy.run's hook
        )

    def uses_merge_call(self) -> bool:
        """`True`: Keras's optimizer updates go through `merge_call`.

        Its `maybe_merge_call` then hands the update to this strategy even
        when the optimizer was made outside the scope (and holds the default
        strategy), as under the stock mirrored strategy; calling the
        function directly would enter the default strategy's scope inside
        this one, which TensorFlow refuses.
        """
        return True

    def update_variable(
        self, var: Any, fn: Any, args: Any, kwargs: Any, group: bool
    ) -> Any:
        """Updates `var` on its stage's device."""
        # The stock one-device update runs on the host; optimizer math belongs
        # beside the variable, on its stage's device.
        device = backing_variable(var).device
        with tf.device(device), compat.UpdateContext(device):
            result = fn(var, *args, **kwargs)
        if group:
            return result
        return tree.map_structure(self._pipeline.experimental_local_results, result)


def _check_enough_cut_points(model: keras.Model, options: PipelineOptions) -> None:
    # `partition_model` would blame the length of its (internal) device list.
    cuts = valid_cut_points(model)
    k, v = len(options.devices), options.chunks_per_device
    if len(cuts) < k * v - 1:
        raise ValueError(
            f"Cannot cut model {model.name!r} into {k * v} chunks ({k} devices x "
            f"chunks_per_device={v}): it has only {len(cuts)} valid cut point(s) "
            f"({cuts}). Received: chunks_per_device={v} (at most "
            f"{(len(cuts) + 1) // k} for this model on {k} devices)."
        )


def _runs_unsplit(model: keras.Model) -> bool:
    # A subclassed model has no layer graph to cut. Training it with Keras's
    # own train_step is refused (`partition_model`), but one that overrides
    # train_step has trained unsplit: its evaluate and predict follow suit
    # rather than fail after training.
    return not has_layer_graph(model) and compat.overrides_step(model, "train")
