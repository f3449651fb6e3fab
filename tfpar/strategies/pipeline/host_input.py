"""The pipeline's input: one tf.data iterator on the host, no MultiDeviceIterator.

`PipelineStrategy` has one replica, on the host's CPU, where the batches are
made; the stock one-device strategy still reads them through a
`MultiDeviceIterator`, whose background thread copies each element to the
device it is already on. In TensorFlow 2.21 that thread can outlive what it
reads: `MultiDeviceBuffer`'s destructor cancels and joins the thread only if
the thread has already begun to run (`multi_device_iterator_ops.cc`), so an
iterator dropped just after its first read can leave the thread to start
during the teardown, reading through a destroyed context. That is the
coordinator's segmentation fault of issue 15 (`docs/pipeline.md` has the
stacks and the runs). A plain tf.data iterator cancels and joins its threads
when it is destroyed, so the pipeline reads its batches through one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

from tfpar._validation import check_instance


class HostDataset(tf.distribute.DistributedDataset):
    """A dataset distributed to the one replica on the host: iterated as is.

    Its iterator is a `tf.data.Iterator` on `host`, prefetching
    `options.experimental_per_replica_buffer_size` batches as the stock
    one-device strategy's per-device buffer does. `strategy.run` takes its
    batches as they are, and Keras's `fit`, `evaluate` and `predict` read it
    like any distributed dataset.

    Args:
        dataset: The `tf.data.Dataset` to iterate.
        host: The device of the one replica.
        options: `tf.distribute.InputOptions` or `None` (the defaults).

    Raises:
        TypeError: If `options` is not `tf.distribute.InputOptions` or `None`.
        ValueError: If `options` asks for `InputReplicationMode.PER_REPLICA`,
            which, as for the stock strategies, only
            `distribute_datasets_from_function` accepts.

    Example:

    ```python
    dataset = tf.data.Dataset.range(8).batch(4)
    for batch in HostDataset(dataset, "/device:CPU:0", None):
        strategy.run(step, args=(batch,))
    ```
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        host: str,
        options: tf.distribute.InputOptions | None,
        *,
        per_replica_allowed: bool = False,
    ) -> None:
        options = _checked_options(options, per_replica_allowed)
        buffer = options.experimental_per_replica_buffer_size
        self._dataset = dataset.prefetch(buffer) if buffer else dataset
        self._host = host

    def __iter__(self) -> Iterator[Any]:
        with tf.device(self._host):
            return iter(self._dataset)

    @property
    def element_spec(self) -> Any:
        """The element spec of the dataset: the one replica's batches."""
        return self._dataset.element_spec

    def reduce(self, initial_state: Any, reduce_func: Callable[..., Any]) -> Any:
        """Reduces the elements, as `tf.data.Dataset.reduce` does."""
        return self._dataset.reduce(initial_state, reduce_func)


def _checked_options(
    options: tf.distribute.InputOptions | None, per_replica_allowed: bool
) -> tf.distribute.InputOptions:
    if options is None:
        return tf.distribute.InputOptions()
    check_instance(
        "options", options, tf.distribute.InputOptions, "tf.distribute.InputOptions"
    )
    per_replica = tf.distribute.InputReplicationMode.PER_REPLICA
    if options.experimental_replication_mode == per_replica and not per_replica_allowed:
        raise ValueError(
            "InputReplicationMode.PER_REPLICA is only supported by "
            "`distribute_datasets_from_function`. Received: options="
            f"{options!r} in `experimental_distribute_dataset`."
        )
    return options
