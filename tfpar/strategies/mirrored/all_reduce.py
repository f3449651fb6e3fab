"""Gradient all-reduce for `tfpar.MirroredStrategy`: choice, compression, packing, counters.

Keras 3 sums a step's gradients with one
`tf.distribute.get_replica_context().all_reduce(SUM, grads)`, which ends in
`CrossDeviceOps.batch_reduce_implementation`. `MeasuredAllReduce` is a
`tf.distribute.CrossDeviceOps` placed there: it optionally casts the gradients
down (fp16/bf16) and packs small ones into buckets, hands them to a wrapped
stock algorithm, undoes both, and adds a few graph ops that time the reduction
and count its bytes into host variables.

That Python runs only while a step is traced, so everything measured per step
is an op in the graph: `tf.timestamp()` ops under control dependencies and
`assign_add`s into float64 counter variables (`allreduce_counters.py`), which
never appear in a saved model or checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tfpar._compat import mirrored as compat
from tfpar.devices import canonical_device
from tfpar.stats import CommunicationStats
from tfpar.strategies.mirrored.counters import AllReduceCounters
from tfpar.strategies.mirrored.options import AllReduceOptions
from tfpar.strategies.mirrored.tensors import (
    all_finite,
    bucket_indices,
    byte_size,
    cast_on_device,
    is_dense_float,
    pack,
    timestamp_after,
    unpack,
    zero_unless,
)

_COMPRESSED_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}


class MeasuredAllReduce(tf.distribute.CrossDeviceOps):
    """A `tf.distribute.CrossDeviceOps` adding compression, packing and counters.

    It wraps another `CrossDeviceOps` (the algorithm) and changes only the
    gradient paths: `batch_reduce` (Keras's gradient all-reduce) and the
    replica-context `_all_reduce` (the same reduction without `merge_call`,
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

    Args:
        devices: Canonical names of the replica devices, in replica order.
        options: An `AllReduceOptions`.
        algorithm: The wrapped `CrossDeviceOps`, or `None` to bind one later
            with `bind` (the strategy binds its stock default).

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
    ) -> None:
        super().__init__()
        self._devices = tuple(devices)
        self._options = options
        self._algorithm = algorithm
        self._counters = AllReduceCounters(self._devices)
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

    def stats(self) -> CommunicationStats:
        """Returns the cumulative counters (one host read of each variable)."""
        return self._counters.stats()

    def skipped_steps(self) -> int:
        """Returns how many reductions `on_nonfinite="skip"` zeroed."""
        return self._counters.skipped_steps()

    # -- Pass-through of everything but batch_reduce. -------------------------

    @property
    def _num_between_graph_workers(self) -> int:
        return self.algorithm._num_between_graph_workers

    def reduce_implementation(
        self, reduce_op: Any, per_replica_value: Any, destinations: Any, options: Any
    ) -> Any:
        return self.algorithm.reduce_implementation(
            reduce_op, per_replica_value, destinations, options
        )

    def broadcast_implementation(self, tensor: Any, destinations: Any) -> Any:
        return self.algorithm.broadcast_implementation(tensor, destinations)

    def _gather_implementation(
        self, per_replica_value: Any, destinations: Any, axis: Any, options: Any
    ) -> Any:
        return self.algorithm._gather_implementation(
            per_replica_value, destinations, axis, options
        )

    def _all_reduce(
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
            return algorithm._all_reduce(reduce_op, value, replica_id, options)
        device = flat[0].device
        start = timestamp_after(flat, device) if self._options.measure else None
        target = _COMPRESSED_DTYPES.get(self._options.compression or "")
        wire = [
            cast_on_device(t, target) if target is not None and is_dense_float(t) else t
            for t in flat
        ]
        buckets = bucket_indices(wire, self._options.bucket_bytes)
        results = algorithm._all_reduce(
            reduce_op,
            [pack([wire[k] for k in b]) for b in buckets],
            replica_id,
            options,
        )
        out = list(flat)
        for bucket, result in zip(buckets, results, strict=True):
            pieces = unpack(result, [wire[k].shape for k in bucket])
            for k, piece in zip(bucket, pieces, strict=True):
                out[k] = cast_on_device(piece, flat[k].dtype)
        skipped = tf.constant(0.0, tf.float64)
        if self._options.on_nonfinite is not None:
            with tf.device(device):
                ok = all_finite(out)
            if self._options.on_nonfinite == "raise":
                check = tf.debugging.Assert(
                    ok,
                    [
                        "tfpar.MirroredStrategy with on_nonfinite=raise: the "
                        f"all-reduced gradients hold NaN or Inf. Replica {replica_id}'s "
                        "own gradients were finite:",
                        all_finite(flat),
                    ],
                    name="tfpar_nonfinite_gradients",
                )
                with tf.control_dependencies([check]):
                    out = [tf.identity(t) for t in out]
            else:
                out = [zero_unless(ok, t) for t in out]
                skipped = 1.0 - tf.cast(ok, tf.float64)
        if self._options.measure:
            n = len(self._devices)
            moved = sum(byte_size(w) for w in wire)
            logical = sum(byte_size(t) for t in flat)
            seconds = timestamp_after(out, device) - start
            totals = [1.0, seconds, len(buckets), logical, moved, skipped]
            sent = 2.0 * (n - 1) / n * moved  # a ring: collective ops only
            self._counters.add_replica(replica_id, totals, seconds, sent)
        elif self._options.on_nonfinite == "skip":
            self._counters.add_replica(replica_id, [0, 0, 0, 0, 0, skipped])
        return tf.nest.pack_sequence_as(value, out)

    # -- The gradient path. ----------------------------------------------------

    def batch_reduce_implementation(
        self, reduce_op: Any, value_destination_pairs: Any, options: Any
    ) -> list[Any]:
        pairs = list(value_destination_pairs)
        if not pairs:
            return []
        values = [v for v, _ in pairs]
        n = len(values[0].values)
        starts = [
            timestamp_after([v.values[i] for v in values], values[0].values[i].device)
            for i in range(n)
        ]
        logical = sum(byte_size(v.values[0]) for v in values)
        skipped = tf.constant(0.0, tf.float64)
        sent = [0.0] * n  # unknown routing for reductions onto other devices
        if all(_is_all_reduce(v, d) for v, d in pairs):
            reduced, calls, moved = self._transformed_all_reduce(
                reduce_op, values, options
            )
            sent = self._bytes_sent(moved, n)
            if self._options.on_nonfinite is not None:
                reduced, skipped = self._check_finite(values, reduced)
        else:
            # Reductions onto other devices (not Keras's gradient path) pass
            # through untouched: no compression, packing or finiteness check.
            reduced = self.algorithm.batch_reduce_implementation(
                reduce_op, pairs, options
            )
            calls, moved = len(pairs), logical
        if not self._options.measure:
            if self._options.on_nonfinite == "skip":
                self._counters.add_skipped(skipped)
            return reduced
        copies = [r.values if _is_distributed(r) else (r,) for r in reduced]
        ends = [
            timestamp_after([c[min(i, len(c) - 1)] for c in copies], device)
            for i, device in enumerate(v.device for v in values[0].values)
        ]
        step_seconds = tf.reduce_max(tf.stack(ends)) - tf.reduce_max(tf.stack(starts))
        per_device = None
        if len(ends) == len(self._devices):
            per_device = tf.stack(ends) - tf.stack(starts)
        totals = [1.0, step_seconds, calls, logical, moved, skipped]
        self._counters.add_batch(totals, per_device, sent)
        return reduced

    def _bytes_sent(self, moved: int, n: int) -> list[float]:
        """Bytes each replica sends in one all-reduce of `moved` bytes each.

        Known from the algorithm's routing, not observed: a ring (TensorFlow's
        collective all-reduce, NCCL) sends 2(n-1)/n of the buffer from every
        device; reduction to one device sends the whole buffer from every
        other replica and n-1 copies of the result from the destination (a
        destination that is not a replica is not counted). Other algorithms
        (hierarchical copy, user-given ones): 0, routing unknown.
        """
        algorithm = self.algorithm
        if isinstance(algorithm, tf.distribute.ReductionToOneDevice):
            target = algorithm.reduce_to_device
            names = [canonical_device(d) for d in self._devices]
            index = 0 if target is None else _find(canonical_device(target), names)
            return [float((n - 1) * moved if i == index else moved) for i in range(n)]
        if self._collective or isinstance(algorithm, tf.distribute.NcclAllReduce):
            return [2.0 * (n - 1) / n * moved] * n
        return [0.0] * n

    def _transformed_all_reduce(
        self, reduce_op: Any, values: list[Any], options: Any
    ) -> tuple[list[Any], int, int]:
        """Compresses, packs, reduces, unpacks and decompresses an all-reduce.

        Returns:
            The reduced `Mirrored` values in input order, the number of
            tensors given to the algorithm, and the bytes per replica moved.
        """
        n = len(values[0].values)
        target = _COMPRESSED_DTYPES.get(self._options.compression or "")
        # wire[k][i]: tensor k of replica i as it will travel (cast down if asked).
        wire = [
            [cast_on_device(t, target) for t in v.values]
            if target is not None and is_dense_float(v.values[0])
            else list(v.values)
            for v in values
        ]
        buckets = bucket_indices([w[0] for w in wire], self._options.bucket_bytes)
        packed = [
            compat.per_replica([pack([wire[k][i] for k in bucket]) for i in range(n)])
            for bucket in buckets
        ]
        results = self.algorithm.batch_reduce_implementation(
            reduce_op, [(p, p) for p in packed], options
        )
        per_tensor: list[list[Any]] = [[] for _ in values]
        for bucket, result in zip(buckets, results, strict=True):
            shapes = [wire[k][0].shape for k in bucket]
            for copy in result.values:
                for k, piece in zip(bucket, unpack(copy, shapes), strict=True):
                    per_tensor[k].append(piece)
        reduced = [
            compat.mirrored([cast_on_device(c, v.values[0].dtype) for c in copies])
            for v, copies in zip(values, per_tensor, strict=True)
        ]
        moved = sum(byte_size(w[0]) for w in wire)
        return reduced, len(buckets), moved

    def _check_finite(
        self, values: list[Any], reduced: list[Any]
    ) -> tuple[list[Any], Any]:
        """Applies `on_nonfinite` to the reduced values; every replica agrees.

        Each replica tests its own copy of the reduced values, which are equal
        on all replicas, so they all take the same decision without another
        exchange.
        """
        copies = [r.values for r in reduced]
        n = len(copies[0])
        ok = []
        for i in range(n):
            with tf.device(copies[0][i].device):
                ok.append(all_finite([c[i] for c in copies]))
        if self._options.on_nonfinite == "raise":
            local = tf.stack(
                [all_finite([v.values[i] for v in values]) for i in range(n)]
            )
            culprits = tf.strings.reduce_join(
                tf.boolean_mask(tf.constant(self._devices), tf.logical_not(local)),
                separator=", ",
            )
            check = tf.debugging.Assert(
                ok[0],
                [
                    "tfpar.MirroredStrategy with on_nonfinite=raise: the all-reduced "
                    "gradients hold NaN or Inf. Replica(s) whose own gradients were "
                    "not finite:",
                    culprits,
                ],
                name="tfpar_nonfinite_gradients",
            )
            with tf.control_dependencies([check]):
                out = [
                    compat.mirrored([tf.identity(c) for c in r.values]) for r in reduced
                ]
            return out, tf.constant(0.0, tf.float64)
        out = [
            compat.mirrored([zero_unless(ok[i], c) for i, c in enumerate(r.values)])
            for r in reduced
        ]
        return out, 1.0 - tf.cast(ok[0], tf.float64)


def _find(name: str, names: list[str]) -> int | None:
    return names.index(name) if name in names else None


def _is_distributed(value: Any) -> bool:
    return isinstance(value, tf.distribute.DistributedValues)


def _is_all_reduce(value: Any, destination: Any) -> bool:
    """Whether a pair reduces a value onto the same devices it lives on."""
    if not (_is_distributed(value) and _is_distributed(destination)):
        return False
    here = [tf.DeviceSpec.from_string(t.device) for t in value.values]
    there = [tf.DeviceSpec.from_string(t.device) for t in destination.values]
    return here == there and all(isinstance(t, tf.Tensor) for t in value.values)
