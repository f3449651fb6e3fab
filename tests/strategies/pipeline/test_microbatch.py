"""Tests for tfpar.strategies.microbatch."""

import numpy as np
import pytest
import tensorflow as tf

from tfpar.strategies.pipeline import microbatch


def test_sizes_differ_by_at_most_one() -> None:
    assert microbatch.microbatch_sizes(8, 4) == [2, 2, 2, 2]
    assert microbatch.microbatch_sizes(10, 4) == [3, 3, 2, 2]
    assert microbatch.microbatch_sizes(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="num_microbatches=4"):
        microbatch.microbatch_sizes(3, 4)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"an int >= 1\. Received: num_microbatches=0\."),
        (-1, ValueError, r"an int >= 1\. Received: num_microbatches=-1\."),
        (2.0, TypeError, r"an int\. Received: num_microbatches=2\.0 of type float"),
        (True, TypeError, r"an int\. Received: num_microbatches=True of type bool"),
        ("4", TypeError, r"an int\. Received: num_microbatches='4' of type str"),
    ],
)
def test_num_microbatches_is_validated(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        microbatch.validate_num_microbatches(value)


def test_split_and_concat_round_trip_with_remainder() -> None:
    x = np.arange(20, dtype="float32").reshape(10, 2)
    y = {"a": np.arange(10), "b": np.arange(10) * 2}

    @tf.function
    def round_trip(x: tf.Tensor, y: dict) -> tuple:
        parts, sizes = microbatch.split((x, y, None), 4)
        shapes = [tf.shape(p[0])[0] for p in parts]
        assert all(p[2] is None for p in parts)
        return (
            microbatch.concat([p[0] for p in parts]),
            microbatch.concat([p[1] for p in parts]),
            sizes,
            tf.stack(shapes),
        )

    x_back, y_back, sizes, shapes = round_trip(tf.constant(x), y)
    np.testing.assert_array_equal(x_back, x)
    np.testing.assert_array_equal(y_back["b"], y["b"])
    assert sizes.numpy().tolist() == [3, 3, 2, 2]
    assert shapes.numpy().tolist() == [3, 3, 2, 2]


def test_batch_smaller_than_microbatches_says_so() -> None:
    @tf.function
    def split(x: tf.Tensor) -> tf.Tensor:
        parts, _ = microbatch.split(x, 4)
        return microbatch.concat(parts)

    with pytest.raises(tf.errors.InvalidArgumentError, match="num_microbatches=4"):
        split(tf.zeros([3, 2]))
