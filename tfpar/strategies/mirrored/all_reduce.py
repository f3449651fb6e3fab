"""`MeasuredAllReduce`: the `CrossDeviceOps` that receives Keras's gradient all-reduce.

Keras 3 sums a step's gradients with one
`tf.distribute.get_replica_context().all_reduce(SUM, grads)`, which ends in
`CrossDeviceOps.batch_reduce_implementation` (or, inside a `tf.cond` with
gradient accumulation, in the replica-context all-reduce of each replica).
Both entry points take one path: measure the inputs' arrival, encode each
replica's tensors (`codec.py`), hand them to a wrapped stock algorithm,
decode, apply `on_nonfinite` (`nonfinite.py`), measure the outputs' arrival
(`measurement.py`) and add it to host counter variables (`counters.py`),
which never appear in a saved model or checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from tfpar._clocks import HostClocks
from tfpar._compat import mirrored as compat
from tfpar.devices import canonical_device
from tfpar.stats import CommunicationStats
from tfpar.strategies.mirrored.arrivals import Arrivals
from tfpar.strategies.mirrored.codec import Codec, byte_size, is_dense_float
from tfpar.strategies.mirrored.counters import AllReduceCounters
from tfpar.strategies.mirrored.measurement import (
    Reduction,
    bytes_sent,
    ring_bytes_sent,
    routing_known,
)
from tfpar.strategies.mirrored.nonfinite import NonFinitePolicy
from tfpar.strategies.mirrored.options import AllReduceOptions

# Hands every replica's packed buckets to the algorithm, returns its results.
Exchange = Callable[[list[list[Any]]], list[list[Any]]]


class MeasuredAllReduce(compat.CrossDeviceOpsHooks):
    """A `tf.distribute.CrossDeviceOps` adding compression, packing and counters.

    It wraps another `CrossDeviceOps` (the algorithm) and changes only the
    gradient paths: `batch_reduce` (Keras's gradient all-reduce) and the
    replica-context all-reduce (the same reduction without `merge_call`,
    inside a `tf.cond` with gradient accumulation). Other calls (single
    `reduce`, `broadcast`, gather) go to the wrapped algorithm unchanged and
    are not counted.

    What is timed, per executed batch reduction: from the moment the last
    replica has all its inputs (host `tf.timestamp()` after control
    dependencies on them) to the moment every reduced output exists on every
    replica, including the casts and the packing. Overlap of early gradients'
    reduction with the rest of the backward pass is not counted: this is the
    exposed communication time. On GPUs the host timestamps see when kernels
    were enqueued and the values became available to the host's executor,
    which is an approximation; use the profiler for kernel times.

    Also measured, per replica of the whole group: how long it took from
    being released by the previous reduction to arriving at this one, which
    names the replica the others waited for and how long (`arrivals.py`).

    Args:
        devices: Canonical names of the replica devices, in replica order.
        options: An `AllReduceOptions`.
        algorithm: The wrapped `CrossDeviceOps`, or `None` to bind one later
            with `bind` (the strategy binds its stock default).
        group_devices: Every replica taking part in each reduction, in every
            process, in slot order (`None`, the default: `devices`, this
            process's replicas). A multi-worker strategy's all-reduce spans
            every worker's replicas.

    Example:

    ```python
    ops = MeasuredAllReduce(
        ["/device:CPU:0", "/device:CPU:1"],
        AllReduceOptions(),
        algorithm=tf.distribute.ReductionToOneDevice(),
    )
    strategy = tf.distribute.MirroredStrategy(
        ["/device:CPU:0", "/device:CPU:1"], cross_device_ops=ops
    )
    ```
    """

    def __init__(
        self,
        devices: Sequence[str],
        options: AllReduceOptions,
        algorithm: tf.distribute.CrossDeviceOps | None = None,
        group_devices: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self._devices = tuple(devices)
        group = tuple(group_devices or self._devices)
        self._group_size = len(group)
        self._options = options
        self._algorithm = algorithm
        self._codec = Codec(options.compression, options.bucket_bytes)
        self._nonfinite = NonFinitePolicy(options.on_nonfinite, self._devices)
        self._counters = AllReduceCounters(self._devices, group)
        self._clocks = HostClocks()
        self._arrivals = Arrivals(self._devices, group) if options.measure else None
        # Per local replica, when its current step's inputs existed (a graph
        # tensor, set while a step is traced by `note_step_start`).
        self._step_starts: dict[int, Any] = {}
        self._collective = False
        self._replica_algorithm: tf.distribute.CrossDeviceOps | None = None

    @property
    def options(self) -> AllReduceOptions:
        """The `AllReduceOptions` this object applies."""
        return self._options

    @property
    def algorithm(self) -> tf.distribute.CrossDeviceOps:
        """The wrapped `CrossDeviceOps` that moves the bytes."""
        if self._algorithm is None:
            raise RuntimeError("MeasuredAllReduce used before bind() was called.")
        return self._algorithm

    def bind(
        self,
        algorithm: tf.distribute.CrossDeviceOps,
        *,
        collective: bool = False,
        replica_algorithm: tf.distribute.CrossDeviceOps | None = None,
    ) -> None:
        """Sets the wrapped algorithm once, when it is only known later.

        Args:
            algorithm: The `CrossDeviceOps` to wrap.
            collective: Whether it may be TensorFlow's collective all-reduce
                (the stock default, whose class is private), which sends as a
                ring. Defaults to `False`.
            replica_algorithm: The collective all-reduce for reductions in a
                replica context (no `merge_call`: Keras's gradient reduction
                inside a `tf.cond` with `gradient_accumulation_steps`), which
                only collective ops can do. Defaults to `algorithm`.
        """
        self._algorithm = algorithm
        self._collective = collective
        self._replica_algorithm = replica_algorithm

    @property
    def _launch_buckets_apart(self) -> bool:
        """Whether each bucket is its own collective, in launch order.

        TensorFlow's collective all-reduce concatenates every tensor of one
        call into a single reduction (its `bytes_per_pack` is 0 by default),
        which waits for the last gradient; one call per bucket lets its
        ordered launches start as their buckets exist. Other algorithms (NCCL
        outside the collective runtime, reduction to one device) keep one
        call: their separate launches are not ordered.
        """
        return self._collective and self._options.bucket_bytes is not None

    def note_step_start(self, inputs: Sequence[Any]) -> None:
        """Notes, while a replica's step is traced, when its inputs exist.

        The step's gradient reduction then counts the replica's busy time:
        from its inputs to its gradients, the forward and backward pass. A
        step that reduces no gradient (evaluation, prediction) counts none.
        Called from the replica's own context; inputs on no replica device
        (or no tensor inputs) are not timed.
        """
        if not self._options.measure:
            return
        tensors = [t for t in tf.nest.flatten(inputs) if isinstance(t, tf.Tensor)]
        if not tensors:
            return
        # The inputs are unplaced in the step's graph; an op made here takes
        # the replica's device from the replica context's device scope.
        probe = tf.identity(tensors[0])
        devices = [canonical_device(d) for d in self._devices]
        device = canonical_device(probe.device) if probe.device else None
        if device in devices:
            replica = devices.index(device)
            self._step_starts[replica] = self._clocks.after([probe, *tensors], device)

    def stats(self) -> CommunicationStats:
        """Returns the cumulative counters (one host read of each variable).

        Bytes sent per device are not kept for an algorithm whose routing
        is unknown (a user's own `CrossDeviceOps`), and no counter is kept
        with `measure=False`.
        """
        stats = self._counters.stats()
        if not self._options.measure:
            return dataclasses.replace(stats, counters=())
        if self._algorithm is None or routing_known(
            self._algorithm, collective=self._collective
        ):
            return stats
        kept = tuple(c for c in stats.counters if c != "bytes_sent")
        return dataclasses.replace(stats, counters=kept)

    def skipped_steps(self) -> int:
        """Returns how many reductions `on_nonfinite="skip"` zeroed."""
        return self._counters.skipped_steps()

    # -- Pass-through of everything but the gradient paths. -------------------

    def num_between_graph_workers(self) -> int:
        """Returns the wrapped algorithm's number of between-graph workers."""
        return compat.num_between_graph_workers(self.algorithm)

    def reduce_implementation(
        self, reduce_op: Any, per_replica_value: Any, destinations: Any, options: Any
    ) -> Any:
        """Reduces one value with the wrapped algorithm, uncounted."""
        return self.algorithm.reduce_implementation(
            reduce_op, per_replica_value, destinations, options
        )

    def broadcast_implementation(self, tensor: Any, destinations: Any) -> Any:
        """Broadcasts with the wrapped algorithm, uncounted."""
        return self.algorithm.broadcast_implementation(tensor, destinations)

    def gather_implementation(
        self, per_replica_value: Any, destinations: Any, axis: Any, options: Any
    ) -> Any:
        """Gathers with the wrapped algorithm, uncounted."""
        return compat.gather(
            self.algorithm, per_replica_value, destinations, axis, options
        )

    # -- The gradient paths. ---------------------------------------------------

    def replica_all_reduce(
        self, reduce_op: Any, value: Any, replica_id: int, options: Any
    ) -> Any:
        """All-reduce from one replica, without `merge_call` (collectives only).

        Each replica traces this on its own, so it compresses, packs and
        counts its own share: replica 0 adds the step's counters, and its
        `comm_seconds` (which includes waiting for the others), since no
        replica sees another's timestamps here.
        """
        algorithm = self._replica_algorithm or self.algorithm
        flat = tf.nest.flatten(value)
        if not flat or not all(isinstance(t, tf.Tensor) for t in flat):
            return compat.replica_all_reduce(
                algorithm, reduce_op, value, replica_id, options
            )

        def exchange(packed: list[list[Any]]) -> list[list[Any]]:
            if not self._launch_buckets_apart:
                return [
                    compat.replica_all_reduce(
                        algorithm, reduce_op, packed[0], replica_id, options
                    )
                ]
            return [
                [
                    compat.replica_all_reduce(
                        algorithm, reduce_op, [bucket], replica_id, options
                    )[0]
                    for bucket in packed[0]
                ]
            ]

        outputs, reduction = self._reduce([flat], exchange, reduce_op, replica_id)
        if self._options.measure:
            seconds = reduction.ends[0] - reduction.starts[0]
            sent = ring_bytes_sent(self._group_size, reduction.moved_bytes)
            totals = reduction.totals(seconds)
            self._counters.add_replica(replica_id, totals, seconds, sent)
        elif self._options.on_nonfinite == "skip":
            self._counters.add_replica(replica_id, [0, 0, 0, 0, 0, reduction.skipped])
        return tf.nest.pack_sequence_as(value, outputs[0])

    def batch_reduce_implementation(
        self, reduce_op: Any, value_destination_pairs: Any, options: Any
    ) -> list[Any]:
        """Reduces every gradient at once, from every replica (with `merge_call`).

        Reductions onto other devices than the values' own (not Keras's
        gradient path) pass through untouched: no compression, packing or
        finiteness check, and bytes sent are not counted.
        """
        pairs = list(value_destination_pairs)
        if not pairs:
            return []
        values = [v for v, _ in pairs]
        n = len(values[0].values)
        replicas = [[v.values[i] for v in values] for i in range(n)]
        if all(_is_all_reduce(v, d) for v, d in pairs):
            # A multi-worker strategy with one replica per process names that
            # replica's device as the destination, and gets plain tensors.
            named = not _is_distributed(pairs[0][1])

            def exchange(packed: list[list[Any]]) -> list[list[Any]]:
                buckets = [
                    (b, pairs[0][1] if named else b)
                    for b in (
                        compat.per_replica(copies)
                        for copies in zip(*packed, strict=True)
                    )
                ]
                reduce = self.algorithm.batch_reduce_implementation
                if self._launch_buckets_apart:
                    results = [reduce(reduce_op, [b], options)[0] for b in buckets]
                else:
                    results = reduce(reduce_op, buckets, options)
                return [
                    [r.values[i] if _is_distributed(r) else r for r in results]
                    for i in range(n)
                ]

            outputs, reduction = self._reduce(replicas, exchange, reduce_op)
            reduced = (
                list(outputs[0])
                if named
                else [compat.mirrored(copies) for copies in zip(*outputs, strict=True)]
            )
            sent = bytes_sent(
                self.algorithm,
                self._devices,
                reduction.moved_bytes,
                collective=self._collective,
                group_size=self._group_size,
            )
        else:
            devices = [tensors[0].device for tensors in replicas]
            starts = self._timestamps(replicas, devices)
            reduced = self.algorithm.batch_reduce_implementation(
                reduce_op, pairs, options
            )
            copies = [r.values if _is_distributed(r) else (r,) for r in reduced]
            # A reduction onto one device has one copy, which every replica waits for.
            ends = self._timestamps(
                [[c[min(i, len(c) - 1)] for c in copies] for i in range(n)],
                devices,
                after=starts,
            )
            logical = sum(byte_size(t) for t in replicas[0])
            skipped = tf.constant(0.0, tf.float64)
            reduction = Reduction(starts, ends, len(pairs), logical, logical, skipped)
            sent = [0.0] * n
        if self._options.measure:
            self._add_batch(reduction, sent)
        elif self._options.on_nonfinite == "skip":
            self._counters.add_skipped(reduction.skipped)
        return reduced

    def _reduce(
        self,
        replicas: list[list[Any]],
        exchange: Exchange,
        reduce_op: Any,
        replica_id: int | None = None,
    ) -> tuple[list[list[Any]], Reduction]:
        """The one reduction path: measure, encode, exchange, decode, check.

        Args:
            replicas: Per replica seen, its tensors: every replica in a batch
                reduction, only replica `replica_id` in a replica context.
            exchange: Hands the encoded buckets to the algorithm.
            reduce_op: The `tf.distribute.ReduceOp` the algorithm applies.
            replica_id: The replica of a replica context, else `None`.

        Returns:
            Per replica seen, its reduced tensors, and what was measured.
        """
        devices = [tensors[0].device for tensors in replicas]
        local = list(range(len(replicas))) if replica_id is None else [replica_id]
        # When each replica's step began, where `note_step_start` saw it: its
        # arrival is timestamped after that, so its busy time is never below 0
        # when the first timestamp op happens to run late.
        graph = tf.compat.v1.get_default_graph()
        begun = [self._step_starts.pop(i, None) for i in local]
        begun = [b if b is not None and b.graph is graph else None for b in begun]
        starts = self._timestamps(
            [
                [*t, *([b] if b is not None else [])]
                for t, b in zip(replicas, begun, strict=True)
            ],
            devices,
        )
        encoded = [self._codec.encode(tensors) for tensors in replicas]
        # Last bucket first: the backward pass computes the last layers'
        # gradients first, so buckets launched apart start reducing while
        # the earlier layers' gradients are still being computed.
        packed = [e.packed[::-1] for e in encoded]
        arrivals = self._arrivals
        took_all = None
        if arrivals is not None:
            took = [arrivals.took(i, t) for i, t in zip(local, starts, strict=True)]
            if replica_id is None and arrivals.group_size == len(self._devices):
                took_all = tf.stack(took)
            else:
                # This reduction does not see every replica: the intervals
                # travel with the gradients, one slot per replica.
                packed = [
                    [*p, arrivals.slot_vector(i, t, _first_dense(p))]
                    for i, t, p in zip(local, took, packed, strict=True)
                ]
        results = exchange(packed)
        if arrivals is not None and took_all is None:
            took_all = tf.cast(results[0][-1], tf.float64)
            if reduce_op == tf.distribute.ReduceOp.MEAN:
                took_all *= arrivals.group_size
            results = [r[:-1] for r in results]
        decoded = [e.decode(r[::-1]) for e, r in zip(encoded, results, strict=True)]
        outputs, skipped = self._nonfinite.apply(replicas, decoded, devices, replica_id)
        ends = self._timestamps(outputs, devices, after=starts)
        if starts:
            for i, began, arrived in zip(local, begun, starts, strict=True):
                if began is not None:
                    self._counters.add_busy(i, arrived - began)
        if arrivals is not None:
            for i, end in zip(local, ends, strict=True):
                arrivals.release(i, end)
            if local[0] == 0:  # every replica knows every interval; one counts
                waits, slowest = arrivals.waits(took_all)
                self._counters.add_waits(0, waits, slowest)
        reduction = Reduction(
            starts=starts,
            ends=ends,
            calls=len(encoded[0].packed),
            logical_bytes=sum(byte_size(t) for t in replicas[0]),
            moved_bytes=encoded[0].wire_bytes,
            skipped=skipped,
        )
        return outputs, reduction

    def _timestamps(
        self,
        replicas: list[list[Any]],
        devices: Sequence[str],
        after: Sequence[Any] = (),
    ) -> list[Any]:
        """Per replica, a host timestamp once its tensors exist (if measuring).

        With `after` (the replicas' start timestamps), each is also taken
        after the replica's start was: a start timestamp op that happens to
        run late, once the outputs already exist, would otherwise make the
        interval negative (seen once in CI on a loaded machine).
        """
        if not self._options.measure:
            return []
        if after:
            replicas = [[*t, a] for t, a in zip(replicas, after, strict=True)]
        return [
            self._clocks.after(tensors, device)
            for tensors, device in zip(replicas, devices, strict=True)
        ]

    def _add_batch(self, reduction: Reduction, sent: list[float]) -> None:
        """Counts a batch reduction: the last input to the last output, per device."""
        starts, ends = tf.stack(reduction.starts), tf.stack(reduction.ends)
        seconds = tf.reduce_max(ends) - tf.reduce_max(starts)
        per_device = (
            ends - starts if len(reduction.ends) == len(self._devices) else None
        )
        self._counters.add_batch(reduction.totals(seconds), per_device, sent)


def _first_dense(tensors: Sequence[Any]) -> Any:
    """The first dense float tensor of one replica's exchange, else its first."""
    return next((t for t in tensors if is_dense_float(t)), tensors[0])


def _is_distributed(value: Any) -> bool:
    return isinstance(value, tf.distribute.DistributedValues)


def _is_all_reduce(value: Any, destination: Any) -> bool:
    """Whether a pair reduces a value onto the same devices it lives on.

    The destination is distributed values (a mirrored strategy's gradients),
    or, for one replica per process (a multi-worker strategy), that replica's
    device name or a tensor on it.
    """
    if not _is_distributed(value):
        return False
    if _is_distributed(destination):
        there = [t.device for t in destination.values]
    elif isinstance(destination, str):
        there = [destination]
    else:
        there = [getattr(destination, "device", "")]
    here = [t.device for t in value.values]
    return [canonical_device(d) for d in here] == [
        canonical_device(d) for d in there
    ] and all(isinstance(t, tf.Tensor) for t in value.values)
