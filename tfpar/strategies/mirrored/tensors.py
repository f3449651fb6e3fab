"""Per-replica tensor pieces of `MeasuredAllReduce`: packing, casts, checks, timers.

Small dense gradients of one dtype travel as one flat buffer (`pack`), split
back into their shapes after the reduction (`unpack`); compression is a cast
on the tensor's own device; timing is a host timestamp under control
dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def bucket_indices(tensors: Sequence[Any], bucket_bytes: int | None) -> list[list[int]]:
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
        packable = is_dense_float(t) and t.shape.is_fully_defined()
        nbytes = byte_size(t)
        if packable and t.dtype == open_dtype and size + nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
            open_dtype = t.dtype if packable else None
    return buckets


def is_dense_float(t: Any) -> bool:
    """Whether `t` is a dense floating-point tensor (what compression casts)."""
    return isinstance(t, tf.Tensor) and t.dtype.is_floating


def byte_size(t: Any) -> int:
    """Bytes of `t`, known at trace time; 0 for `IndexedSlices` or unknown shapes."""
    if isinstance(t, tf.IndexedSlices) or not t.shape.is_fully_defined():
        return 0  # Unknown at trace time; documented as not counted.
    return int(np.prod(t.shape)) * t.dtype.size


def cast_on_device(t: Any, dtype: tf.DType) -> Any:
    """Casts `t` on its own device (a no-op if it already has `dtype`)."""
    if t.dtype == dtype:
        return t
    with tf.device(t.device):
        return tf.cast(t, dtype)


def pack(tensors: list[Any]) -> Any:
    """One replica's bucket as a flat tensor (a single tensor stays as it is)."""
    if len(tensors) == 1:
        return tensors[0]
    with tf.device(tensors[0].device):
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def unpack(flat: Any, shapes: list[tf.TensorShape]) -> list[Any]:
    """Inverse of `pack` on one replica's reduced bucket."""
    if len(shapes) == 1:
        return [flat]
    with tf.device(flat.device):
        pieces = tf.split(flat, [int(np.prod(s)) for s in shapes])
        return [tf.reshape(p, s) for p, s in zip(pieces, shapes, strict=True)]


def zero_unless(ok: Any, t: Any) -> Any:
    """`t` if `ok`, else zeros (`where`, since NaN * 0 is still NaN)."""
    with tf.device(t.device):
        return tf.where(ok, t, tf.zeros_like(t))


def timestamp_after(tensors: Sequence[Any], device: str) -> Any:
    """A host timestamp, on `device`'s host, taken once `tensors` all exist."""
    spec = tf.DeviceSpec.from_string(device)
    if spec.device_type != "CPU":
        spec = spec.replace(device_type="CPU", device_index=0)
    deps = [t.values if isinstance(t, tf.IndexedSlices) else t for t in tensors]
    with tf.device(spec.to_string()), tf.control_dependencies(deps):
        return tf.timestamp()


def all_finite(tensors: Sequence[Any]) -> Any:
    """A scalar bool: whether every float tensor (or slices) is all finite."""
    flags = [
        tf.reduce_all(
            tf.math.is_finite(t.values if isinstance(t, tf.IndexedSlices) else t)
        )
        for t in tensors
        if t.dtype.is_floating
    ]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)
