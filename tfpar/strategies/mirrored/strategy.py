"""`tfpar.MirroredStrategy`: the stock synchronous strategy, validated and measured.

A subclass of `tf.distribute.MirroredStrategy`, so Keras and user code treat it
as the stock one. The constructor validates its arguments (the stock class
silently runs `/gpu:7` on the CPU), picks the gradient all-reduce algorithm,
and installs `tfpar.strategies.mirrored.MeasuredAllReduce` as the strategy's
`cross_device_ops`: the public extension point through which Keras 3's
gradient all-reduce passes.

The replicas may also be the devices of other processes (the workers of a
`tfpar.LocalCluster` after `connect()`): one replica per remote device, driven
from this process, with the input pipeline on this process's CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tfpar._compat import mirrored as compat
from tfpar._datasets import DistributesWithoutAutotuning
from tfpar._validation import check_instance
from tfpar.devices import resolve_devices
from tfpar.stats import CommunicationStats
from tfpar.strategies.mirrored.all_reduce import MeasuredAllReduce
from tfpar.strategies.mirrored.keras_reduce import reduce_for_keras
from tfpar.strategies.mirrored.options import AllReduceOptions
from tfpar.strategies.mirrored.replica_steps import TimesReplicaSteps

# This process's CPU: where the input pipeline runs when the replicas are remote.
_HOST = "/job:localhost/replica:0/task:0/device:CPU:0"


class MirroredStrategy(
    TimesReplicaSteps, DistributesWithoutAutotuning, tf.distribute.MirroredStrategy
):
    """Synchronous data parallelism over local devices, with measured all-reduce.

    A drop-in replacement for `tf.distribute.MirroredStrategy`: each replica
    runs the step on its share of the global batch, and the gradients are
    summed across replicas before every replica applies the same update. With
    the defaults it reduces exactly as the stock strategy does (same algorithm,
    same numbers) and adds a few graph ops per step that time the reduction and
    count its bytes, read with `communication_stats()`.

    Args:
        devices: List or tuple of device names, or `None` (default) for all
            GPUs, else all logical CPUs (see `tfpar.default_devices`). Unlike
            the stock class, a device that does not exist is an error. The
            devices may also all be remote, e.g. the workers of a
            `tfpar.LocalCluster` after `connect()` (which the stock class
            refuses in eager mode): one replica per device, reduced with
            `"reduce_to_one_device"` by default.
        cross_device_ops: Optional `tf.distribute.CrossDeviceOps`, as in the
            stock class. It becomes the wrapped algorithm (compression,
            packing and counters still apply); combine only with
            `all_reduce="auto"`.
        all_reduce: `"auto"` (default: the stock choice: TensorFlow's
            collective all-reduce, ring on CPUs and NCCL on GPUs, reduction to
            one device for mixed CPUs and GPUs; reduction to one device for
            remote devices), `"collective"` and `"nccl"` (local devices only;
            NCCL needs all devices to be GPUs), `"hierarchical_copy"` or
            `"reduce_to_one_device"`.
        compression: `None` (default), `"fp16"` or `"bf16"`: float gradients
            are cast down for the reduction and back after it, halving the
            bytes moved for float32. fp16 overflows above 65504.
        bucket_bytes: `None` (default) or a positive int: small dense
            gradients of one dtype are packed into buckets of at most this
            many bytes, so fewer reductions run. With TensorFlow's collective
            all-reduce (`"collective"`, and `"auto"` on local devices of one
            type), which otherwise concatenates all gradients into one
            reduction, each bucket is its own collective, launched last layer
            first so that it overlaps the rest of the backward pass.
        on_nonfinite: `None` (default), `"skip"` or `"raise"`: decided once
            on the reduced gradients, so every replica agrees. `"skip"`
            applies zero gradients for that step (plain SGD leaves the weights
            unchanged; optimizers with momentum still advance their state) and
            counts it in `skipped_steps()`; `"raise"` stops `fit` with an
            `InvalidArgumentError` listing which replicas had finite gradients.
        measure: Whether to time and count the reductions (default `True`).

    Raises:
        TypeError: If `devices` is not a list or tuple of strings, or
            `cross_device_ops` is not a `tf.distribute.CrossDeviceOps`.
        ValueError: If a device does not exist or repeats, the list is empty
            or mixes local and remote devices, an option is unknown,
            `bucket_bytes <= 0`, NCCL is asked for without all devices being
            GPUs, collective ops for remote devices, or `cross_device_ops` is
            combined with another `all_reduce`.

    Example:

    ```python
    import keras
    import numpy as np
    import tfpar

    tfpar.simulate_devices(2)
    strategy = tfpar.MirroredStrategy(compression="bf16")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((64, 4)), np.ones((64, 1)), batch_size=16, verbose=0)
    print(strategy.communication_stats())
    ```
    """

    def __init__(
        self,
        devices: Sequence[str] | None = None,
        cross_device_ops: tf.distribute.CrossDeviceOps | None = None,
        *,
        all_reduce: str = "auto",
        compression: str | None = None,
        bucket_bytes: int | None = None,
        on_nonfinite: str | None = None,
        measure: bool = True,
    ) -> None:
        names = resolve_devices(devices)
        remote = _are_remote(names)
        options = AllReduceOptions(
            all_reduce=all_reduce,
            compression=compression,
            bucket_bytes=bucket_bytes,
            on_nonfinite=on_nonfinite,
            measure=measure,
        )
        algorithm = _algorithm(names, options, cross_device_ops, remote=remote)
        self._tfpar_reducer = MeasuredAllReduce(names, options, algorithm)
        compat.reserve_collective_keys(self)
        if remote:
            # The stock constructor refuses several tasks in eager mode; its
            # single-worker set-up works for them once built (see _compat).
            super().__init__(
                devices=["/device:CPU:0"], cross_device_ops=self._tfpar_reducer
            )
            compat.use_remote_devices(self.extended, names, _HOST)
            compat.refuse_reductions_in_nested_graphs(
                self.extended,
                ValueError(
                    "tfpar.MirroredStrategy with devices on cluster workers "
                    f"({names}) cannot reduce inside a tf.cond, which Keras "
                    "does for an optimizer with gradient_accumulation_steps: "
                    "there only collective all-reduce can run, and "
                    "TensorFlow's collective ops do not span the tasks of a "
                    "cluster driven from one process. Use local devices, or "
                    "a larger batch instead of gradient_accumulation_steps."
                ),
            )
        else:
            super().__init__(devices=names, cross_device_ops=self._tfpar_reducer)
            # Reductions inside a tf.cond (gradient accumulation) can only use
            # the stock collective ops, from each replica without merge_call.
            stock = compat.stock_default_cross_device_ops(self.extended)
            # Keras's steps_per_execution loop calls the step inside control flow.
            compat.instance_keys_at_trace_time_in_control_flow(stock)
            self._tfpar_reducer.bind(
                algorithm or stock,
                collective=algorithm is None,
                replica_algorithm=stock,
            )
            compat.reduce_without_merge_call_in_nested_graphs(
                self.extended, self._tfpar_reducer
            )

    @property
    def all_reduce_options(self) -> AllReduceOptions:
        """The validated `AllReduceOptions` of this strategy."""
        return self._tfpar_reducer.options

    def communication_stats(self) -> CommunicationStats:
        """Returns cumulative gradient all-reduce counters since construction.

        One host read of a few small variables: cheap enough to call every
        step. `steps` counts executed batch reductions (Keras does one per
        training step, none on steps that only accumulate gradients);
        `calls` the tensors handed to the algorithm (fewer with bucketing);
        `bytes_logical` and `bytes_moved` one replica's gradient bytes before
        and after compression; `comm_seconds` the exposed reduction time (from
        the last replica having all its gradients to every replica having the
        results). `devices` holds, per replica, the time from that replica's
        gradients being ready to its results being ready, which includes
        waiting for slower replicas, and the bytes it sends (computed from
        the algorithm's routing: a ring sends 2(n-1)/n of the buffer from
        each device; see docs/mirrored.md). All zeros with `measure=False`.

        Returns:
            A `tfpar.CommunicationStats` with `kind="allreduce"`.

        Example:

        ```python
        before = strategy.communication_stats()
        model.fit(x, y, epochs=1)
        delta = strategy.communication_stats().since(before)
        print(delta.comm_seconds / max(delta.steps, 1))
        ```
        """
        return self._tfpar_reducer.stats()

    def reduce(self, reduce_op: Any, value: Any, axis: Any) -> Any:
        """Reduces `value` across replicas, as `tf.distribute.Strategy.reduce`.

        One difference: with `axis=None` the replicas' values must have one
        shape, and values that differ (a batch that does not split evenly
        over the replicas) raise a clear `ValueError` instead of the stock
        AddN shape error. Keras's model build, which averages the first batch
        over the replicas only to learn its shapes, gets the first replica's
        batch instead, so `fit` trains on such batches (`keras_reduce.py`).

        Args:
            reduce_op: A `tf.distribute.ReduceOp` or its name.
            value: The per-replica values (a nested structure).
            axis: `None`, or the axis to reduce within each replica's value.

        Returns:
            The reduced value, as the stock strategy returns it.

        Raises:
            ValueError: If `axis=None` and the replicas' values differ in shape.
        """
        return reduce_for_keras(
            super().reduce, reduce_op, value, axis, self.num_replicas_in_sync
        )

    def skipped_steps(self) -> int:
        """Returns how many steps `on_nonfinite="skip"` skipped so far."""
        return self._tfpar_reducer.skipped_steps()


def _are_remote(devices: list[str]) -> bool:
    """Whether the (canonical) devices are all remote; mixing them is refused."""
    remote = [tf.DeviceSpec.from_string(d).job is not None for d in devices]
    if any(remote) and not all(remote):
        raise ValueError(
            "`devices` must be all local or all remote (replicas are driven "
            f"from this process either way). Received: devices={devices} (use "
            "e.g. only the workers' devices of a tfpar.LocalCluster)."
        )
    return all(remote)


def _algorithm(
    devices: list[str],
    options: AllReduceOptions,
    cross_device_ops: tf.distribute.CrossDeviceOps | None,
    *,
    remote: bool,
) -> tf.distribute.CrossDeviceOps | None:
    """Returns the algorithm to wrap, or `None` for the stock default."""
    if cross_device_ops is not None:
        check_instance(
            "cross_device_ops",
            cross_device_ops,
            tf.distribute.CrossDeviceOps,
            "a tf.distribute.CrossDeviceOps",
        )
        if options.all_reduce != "auto":
            raise ValueError(
                "Pass either `cross_device_ops` or `all_reduce`, not both. "
                f"Received: cross_device_ops={cross_device_ops!r}, "
                f"all_reduce={options.all_reduce!r} (must be 'auto' when "
                "cross_device_ops is given)."
            )
        return cross_device_ops
    if remote and options.all_reduce in ("collective", "nccl"):
        # Collective ops need a collective executor set up on every task
        # before connecting; send/recv based reductions need nothing more.
        raise ValueError(
            f"`all_reduce={options.all_reduce!r}` needs local devices. Received: "
            f"all_reduce={options.all_reduce!r} with remote devices={devices} "
            "(use 'auto', 'reduce_to_one_device' or 'hierarchical_copy')."
        )
    if remote and options.all_reduce == "auto":
        return tf.distribute.ReductionToOneDevice()
    kinds = {tf.DeviceSpec.from_string(d).device_type for d in devices}
    if options.all_reduce == "nccl":
        if kinds != {"GPU"}:
            raise ValueError(
                "`all_reduce='nccl'` needs every device to be a GPU. Received: "
                f"all_reduce='nccl' with devices={devices} (use 'auto', "
                "'collective' or 'reduce_to_one_device' on CPUs)."
            )
        return tf.distribute.NcclAllReduce()
    if options.all_reduce == "collective" and len(kinds) > 1:
        raise ValueError(
            "`all_reduce='collective'` needs devices of one type. Received: "
            f"all_reduce='collective' with devices={devices} (use 'auto' or "
            "'reduce_to_one_device' for mixed CPUs and GPUs)."
        )
    if options.all_reduce == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    if options.all_reduce == "reduce_to_one_device":
        return tf.distribute.ReductionToOneDevice()
    return None
