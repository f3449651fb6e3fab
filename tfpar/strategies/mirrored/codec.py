"""How `MeasuredAllReduce`'s gradients travel: cast down, packed into buckets.

Compression is a cast on each tensor's own device, down for the reduction and
back after it. Small dense gradients of one dtype travel as one flat buffer
(`pack`), split back into their shapes after the reduction (`unpack`). Both
apply to one replica's tensors at a time, so the same code serves a batch
reduction (every replica seen at once) and a replica-context one (each
replica on its own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

_COMPRESSED_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One replica's tensors as they travel, and how to restore them.

    Attributes:
        packed: One tensor per bucket, handed to the algorithm.
        buckets: The indices of the original tensors in each bucket.
        shapes: The shape of every tensor as it travels.
        dtypes: The dtype of every original tensor.
        wire_bytes: Bytes of the tensors as they travel (0 for those of
            unknown size).
    """

    packed: list[Any]
    buckets: list[list[int]]
    shapes: list[tf.TensorShape]
    dtypes: list[tf.DType]
    wire_bytes: int

    def decode(self, reduced: Sequence[Any]) -> list[Any]:
        """Unpacks and casts back the reduced buckets, in the original order."""
        out: list[Any] = [None] * len(self.dtypes)
        for bucket, result in zip(self.buckets, reduced, strict=True):
            pieces = unpack(result, [self.shapes[k] for k in bucket])
            for k, piece in zip(bucket, pieces, strict=True):
                out[k] = cast_on_device(piece, self.dtypes[k])
        return out


class Codec:
    """Compresses and packs one replica's tensors for the reduction.

    Args:
        compression: `None`, `"fp16"` or `"bf16"`: the dtype dense float
            tensors travel in.
        bucket_bytes: `None` (one bucket per tensor) or the largest bucket,
            in bytes.
    """

    def __init__(self, compression: str | None, bucket_bytes: int | None) -> None:
        self._target = _COMPRESSED_DTYPES.get(compression or "")
        self._bucket_bytes = bucket_bytes

    def encode(self, tensors: Sequence[Any]) -> Encoded:
        """Casts `tensors` down (if asked) and packs them into buckets."""
        target = self._target
        wire = [
            cast_on_device(t, target) if target is not None and is_dense_float(t) else t
            for t in tensors
        ]
        buckets = bucket_indices(wire, self._bucket_bytes)
        return Encoded(
            packed=[pack([wire[k] for k in bucket]) for bucket in buckets],
            buckets=buckets,
            shapes=[w.shape for w in wire],
            dtypes=[t.dtype for t in tensors],
            wire_bytes=sum(byte_size(w) for w in wire),
        )


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
