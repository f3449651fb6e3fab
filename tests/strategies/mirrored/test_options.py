"""The parts of the all-reduce modules that can be tested without training."""

from __future__ import annotations

import dataclasses

import pytest
import tensorflow as tf

from tfpar.strategies.mirrored.codec import bucket_indices
from tfpar.strategies.mirrored.options import AllReduceOptions


def test_buckets_pack_in_order_by_dtype_and_size() -> None:
    tensors = [
        tf.zeros([10]),  # 40 bytes
        tf.zeros([5]),  # 20
        tf.zeros([30]),  # 120: larger than the bucket, alone
        tf.zeros([4], tf.float16),  # 8: another dtype, new bucket
        tf.zeros([4], tf.float16),  # 8
        tf.zeros([2], tf.int32),  # not a float: alone
        tf.zeros([3]),  # 12
    ]
    assert bucket_indices(tensors, 64) == [[0, 1], [2], [3, 4], [5], [6]]
    assert bucket_indices(tensors, None) == [[i] for i in range(7)]
    assert bucket_indices(tensors, 1 << 20) == [[0, 1, 2], [3, 4], [5], [6]]


def test_options_are_frozen_and_validated() -> None:
    options = AllReduceOptions(compression="fp16", bucket_bytes=1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.compression = "bf16"  # type: ignore[misc]
    with pytest.raises(
        ValueError, match=r"`bucket_bytes` must be an int >= 1\. .*bucket_bytes=-1\."
    ):
        AllReduceOptions(bucket_bytes=-1)
    with pytest.raises(
        TypeError, match=r"an int or None\. Received: bucket_bytes=1\.5 of type float"
    ):
        AllReduceOptions(bucket_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"True or False\. Received: measure='yes'"):
        AllReduceOptions(measure="yes")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"`compression` must be one of None, 'fp16', 'bf16'\. "
        r"Received: compression='None'\.",
    ):
        AllReduceOptions(compression="None")
    with pytest.raises(TypeError, match=r"Received: compression=16 of type int"):
        AllReduceOptions(compression=16)  # type: ignore[arg-type]
