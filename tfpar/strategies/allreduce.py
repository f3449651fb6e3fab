"""Gradient all-reduce for `tfpar.MirroredStrategy`: choice, compression, packing, counters.

Keras 3 sums a step's gradients with one
`tf.distribute.get_replica_context().all_reduce(SUM, grads)`, which ends in
`CrossDeviceOps.batch_reduce_implementation`. `MeasuredAllReduce` is a
`tf.distribute.CrossDeviceOps` placed there: it optionally casts the gradients
down (fp16/bf16) and packs small ones into buckets, hands them to a wrapped
stock algorithm, undoes both, and adds a few graph ops that time the reduction
and count its bytes into host variables.

That Python runs only while a step is traced, so everything measured per step
is an op in the graph: `tf.timestamp()` ops under control dependencies and one
`assign_add` per reduction into a float64 counter vector. The variables are
created eagerly, outside any strategy scope and outside Keras's tracking, so
they never appear in a saved model or checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfpar import _compat as compat
from tfpar.stats import CommunicationStats, DeviceCommunication

ALL_REDUCE_CHOICES = (
    "auto",
    "collective",
    "nccl",
    "hierarchical_copy",
    "reduce_to_one_device",
)
COMPRESSION_CHOICES = (None, "fp16", "bf16")
ON_NONFINITE_CHOICES = (None, "skip", "raise")

_COMPRESSED_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}
# Slots of the counter vector; float64 holds integers exactly up to 2**53.
_STEPS, _SECONDS, _CALLS, _LOGICAL, _MOVED, _SKIPPED = range(6)


@dataclasses.dataclass(frozen=True)
class AllReduceOptions:
    """How `tfpar.MirroredStrategy` reduces gradients.

    Args:
        all_reduce: Algorithm: `"auto"` (default: what the stock strategy
            picks, TensorFlow's collective all-reduce, ring on CPUs and NCCL on
            GPUs, reduction to one device when CPUs and GPUs are mixed),
            `"collective"`, `"nccl"` (GPUs only), `"hierarchical_copy"` or
            `"reduce_to_one_device"`.
        compression: `None` (default), `"fp16"` or `"bf16"`: float32/float64
            gradients are cast down for the reduction and back up after it.
        bucket_bytes: `None` (default: one reduction per gradient, as stock)
            or a positive int: dense gradients of one dtype are packed, in
            order, into buckets of at most this many bytes (a larger gradient
            gets its own bucket), reducing the number of reduction calls.
        on_nonfinite: `None` (default: no check), `"skip"` (a step whose
            reduced gradients hold a NaN or Inf applies zero gradients and is
            counted) or `"raise"` (it fails with `InvalidArgumentError`).
        measure: Whether to add the timing and byte-counting ops (default
            `True`).

    Raises:
        ValueError: If a value is not one of those allowed.
        TypeError: If `bucket_bytes` or `measure` has the wrong type.

    Example:

    ```python
    options = AllReduceOptions(compression="bf16", bucket_bytes=4 << 20)
    ```
    """

    all_reduce: str = "auto"
    compression: str | None = None
    bucket_bytes: int | None = None
    on_nonfinite: str | None = None
    measure: bool = True

    def __post_init__(self) -> None:
        _check_choice("all_reduce", self.all_reduce, ALL_REDUCE_CHOICES)
        _check_choice("compression", self.compression, COMPRESSION_CHOICES)
        _check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE_CHOICES)
        if self.bucket_bytes is not None and (
            isinstance(self.bucket_bytes, bool)
            or not isinstance(self.bucket_bytes, int)
        ):
            raise TypeError(
                "`bucket_bytes` must be None or a positive int. Received: "
                f"bucket_bytes={self.bucket_bytes!r} of type "
                f"{type(self.bucket_bytes).__name__}."
            )
        if self.bucket_bytes is not None and self.bucket_bytes <= 0:
            raise ValueError(
                "`bucket_bytes` must be None or a positive int. Received: "
                f"bucket_bytes={self.bucket_bytes!r} (must be > 0)."
            )
        if not isinstance(self.measure, bool):
            raise TypeError(
                f"`measure` must be a bool. Received: measure={self.measure!r}."
            )


def _check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if isinstance(value, str | type(None)) and value in allowed:
        return
    raise ValueError(
        f"Unknown `{name}`. Received: {name}={value!r} (must be one of "
        f"{', '.join(repr(a) for a in allowed)})."
    )


class MeasuredAllReduce(tf.distribute.CrossDeviceOps):
    """A `tf.distribute.CrossDeviceOps` adding compression, packing and counters.

    It wraps another `CrossDeviceOps` (the algorithm) and changes only
    `batch_reduce`, the path of Keras's gradient all-reduce. Other calls
    (single `reduce`, `broadcast`, gather, replica-context all-reduce) go to the
    wrapped algorithm unchanged and are not counted.

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
        # Created eagerly and outside any strategy scope: plain host variables
        # that Keras does not track, so no checkpoint or saved model has them.
        with tf.init_scope(), tf.device("/device:CPU:0"):
            self._counters = tf.Variable(
                tf.zeros([6], tf.float64), trainable=False, name="tfpar_allreduce"
            )
            self._device_seconds = tf.Variable(
                tf.zeros([len(self._devices)], tf.float64),
                trainable=False,
                name="tfpar_allreduce_devices",
            )

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

    def bind(self, algorithm: tf.distribute.CrossDeviceOps) -> None:
        """Sets the wrapped algorithm once, when it is only known later."""
        self._algorithm = algorithm

    def stats(self) -> CommunicationStats:
        """Returns the cumulative counters (one host read of two variables)."""
        c = self._counters.numpy()
        per_device = self._device_seconds.numpy()
        return CommunicationStats(
            kind="allreduce",
            steps=int(c[_STEPS]),
            comm_seconds=float(c[_SECONDS]),
            calls=int(c[_CALLS]),
            bytes_logical=int(c[_LOGICAL]),
            bytes_moved=int(c[_MOVED]),
            devices=tuple(
                # bytes_sent stays 0: what each device sends depends on the
                # algorithm's internal routing, which is not observable here.
                DeviceCommunication(device=d, comm_seconds=float(s))
                for d, s in zip(self._devices, per_device, strict=True)
            ),
        )

    def skipped_steps(self) -> int:
        """Returns how many reductions `on_nonfinite="skip"` zeroed."""
        return int(self._counters.numpy()[_SKIPPED])

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
        self, reduce_op: Any, value: Any, replica_id: Any, options: Any
    ) -> Any:
        return self.algorithm._all_reduce(reduce_op, value, replica_id, options)

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
            _timestamp_after([v.values[i] for v in values], values[0].values[i].device)
            for i in range(n)
        ]
        logical = sum(_nbytes(v.values[0]) for v in values)
        skipped = tf.constant(0.0, tf.float64)
        if all(_is_all_reduce(v, d) for v, d in pairs):
            reduced, calls, moved = self._transformed_all_reduce(
                reduce_op, values, options
            )
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
                with tf.device("/device:CPU:0"):
                    self._counters.assign_add(
                        tf.one_hot(_SKIPPED, 6, on_value=skipped, dtype=tf.float64)
                    )
            return reduced
        copies = [r.values if _is_distributed(r) else (r,) for r in reduced]
        ends = [
            _timestamp_after([c[min(i, len(c) - 1)] for c in copies], device)
            for i, device in enumerate(v.device for v in values[0].values)
        ]
        step_seconds = tf.reduce_max(tf.stack(ends)) - tf.reduce_max(tf.stack(starts))
        with tf.device("/device:CPU:0"):
            self._counters.assign_add(
                tf.stack(
                    [
                        tf.constant(1.0, tf.float64),
                        step_seconds,
                        tf.constant(float(calls), tf.float64),
                        tf.constant(float(logical), tf.float64),
                        tf.constant(float(moved), tf.float64),
                        skipped,
                    ]
                )
            )
            if len(ends) == len(self._devices):
                self._device_seconds.assign_add(tf.stack(ends) - tf.stack(starts))
        return reduced

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
            [_cast(t, target) for t in v.values]
            if target is not None and _is_dense_float(v.values[0])
            else list(v.values)
            for v in values
        ]
        buckets = _buckets([w[0] for w in wire], self._options.bucket_bytes)
        packed = [
            compat.per_replica([_pack([wire[k][i] for k in bucket]) for i in range(n)])
            for bucket in buckets
        ]
        results = self.algorithm.batch_reduce_implementation(
            reduce_op, [(p, p) for p in packed], options
        )
        per_tensor: list[list[Any]] = [[] for _ in values]
        for bucket, result in zip(buckets, results, strict=True):
            shapes = [wire[k][0].shape for k in bucket]
            for copy in result.values:
                for k, piece in zip(bucket, _unpack(copy, shapes), strict=True):
                    per_tensor[k].append(piece)
        reduced = [
            compat.mirrored([_cast(c, v.values[0].dtype) for c in copies])
            for v, copies in zip(values, per_tensor, strict=True)
        ]
        moved = sum(_nbytes(w[0]) for w in wire)
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
                ok.append(_all_finite([c[i] for c in copies]))
        if self._options.on_nonfinite == "raise":
            local = tf.stack(
                [_all_finite([v.values[i] for v in values]) for i in range(n)]
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
            compat.mirrored([_zero_unless(ok[i], c) for i, c in enumerate(r.values)])
            for r in reduced
        ]
        return out, 1.0 - tf.cast(ok[0], tf.float64)


def _buckets(tensors: Sequence[Any], bucket_bytes: int | None) -> list[list[int]]:
    """Groups tensor indices, in order, into buckets of one dtype and bounded size.

    Only dense float tensors of known shape are packed; any other tensor, or
    one larger than `bucket_bytes`, gets a bucket of its own.
    """
    if bucket_bytes is None:
        return [[i] for i in range(len(tensors))]
    buckets: list[list[int]] = []
    size = 0
    open_dtype = None  # dtype of the last bucket while it can still grow
    for i, t in enumerate(tensors):
        packable = _is_dense_float(t) and t.shape.is_fully_defined()
        nbytes = _nbytes(t)
        if packable and t.dtype == open_dtype and size + nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
            open_dtype = t.dtype if packable else None
    return buckets


def _is_dense_float(t: Any) -> bool:
    return isinstance(t, tf.Tensor) and t.dtype.is_floating


def _nbytes(t: Any) -> int:
    if isinstance(t, tf.IndexedSlices) or not t.shape.is_fully_defined():
        return 0  # Unknown at trace time; documented as not counted.
    return int(np.prod(t.shape)) * t.dtype.size


def _is_distributed(value: Any) -> bool:
    return isinstance(value, tf.distribute.DistributedValues)


def _is_all_reduce(value: Any, destination: Any) -> bool:
    """Whether a pair reduces a value onto the same devices it lives on."""
    if not (_is_distributed(value) and _is_distributed(destination)):
        return False
    here = [tf.DeviceSpec.from_string(t.device) for t in value.values]
    there = [tf.DeviceSpec.from_string(t.device) for t in destination.values]
    return here == there and all(isinstance(t, tf.Tensor) for t in value.values)


def _cast(t: Any, dtype: tf.DType) -> Any:
    """Casts `t` on its own device (a no-op if it already has `dtype`)."""
    if t.dtype == dtype:
        return t
    with tf.device(t.device):
        return tf.cast(t, dtype)


def _pack(tensors: list[Any]) -> Any:
    """One replica's bucket as a flat tensor (a single tensor stays as it is)."""
    if len(tensors) == 1:
        return tensors[0]
    with tf.device(tensors[0].device):
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def _unpack(flat: Any, shapes: list[tf.TensorShape]) -> list[Any]:
    """Inverse of `_pack` on one replica's reduced bucket."""
    if len(shapes) == 1:
        return [flat]
    with tf.device(flat.device):
        pieces = tf.split(flat, [int(np.prod(s)) for s in shapes])
        return [tf.reshape(p, s) for p, s in zip(pieces, shapes, strict=True)]


def _zero_unless(ok: Any, t: Any) -> Any:
    """`t` if `ok`, else zeros (`where`, since NaN * 0 is still NaN)."""
    with tf.device(t.device):
        return tf.where(ok, t, tf.zeros_like(t))


def _timestamp_after(tensors: Sequence[Any], device: str) -> Any:
    """A host timestamp, on `device`'s host, taken once `tensors` all exist."""
    spec = tf.DeviceSpec.from_string(device)
    if spec.device_type != "CPU":
        spec = spec.replace(device_type="CPU", device_index=0)
    deps = [t.values if isinstance(t, tf.IndexedSlices) else t for t in tensors]
    with tf.device(spec.to_string()), tf.control_dependencies(deps):
        return tf.timestamp()


def _all_finite(tensors: Sequence[Any]) -> Any:
    flags = [
        tf.reduce_all(
            tf.math.is_finite(t.values if isinstance(t, tf.IndexedSlices) else t)
        )
        for t in tensors
        if t.dtype.is_floating
    ]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)
