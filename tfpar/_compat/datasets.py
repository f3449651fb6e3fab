"""Private TensorFlow and Keras internals of the datasets the strategies distribute.

Used by `tfpar/_datasets.py`, for `tfpar.MirroredStrategy` and
`tfpar.MultiWorkerMirroredStrategy` (`tfpar.PipelineStrategy` reads through
one plain iterator, `pipeline/host_input.py`):

- `input_lib.DistributedDataset`, `DistributedIterator._iterators`, the
  per-worker iterator's `_iterator`, `OwnedMultiDeviceIterator._devices`,
  `_source_device` and `_device_iterators`, `OwnedIterator._dataset`
  (`without_device_autotune`): a distributed dataset's iterator copies each
  element to every replica's device through one tf.data iterator per
  device, which TensorFlow builds itself, over a dataset of its own with
  default options, so tf.data's autotuning thread runs on it; destroying
  such an iterator (Keras does at every epoch's end) waits for that thread
  to wake (`tfpar/_datasets.py` has the measurements). No option of the
  distributed dataset reaches those iterators; each is built again, before
  its first element, over the same per-device dataset with autotuning off.
- `DistributedDataset._input_workers` and `_options` (`reads_in_place`): a
  worker whose one replica device is its host (a CPU worker) has nothing to
  copy, yet TensorFlow's per-worker input mode builds a
  `MultiDeviceIterator` for it at every epoch, which traces its per-device
  functions again: about 50 ms each (`docs/multi_worker.md`, Performance).
  Such a dataset is given the options of TensorFlow's own per-replica mode
  without copies (`distribute_datasets_from_function`'s), under which its
  per-worker iterator is one plain tf.data iterator. The public method
  refuses those options, so they are set after the dataset is built; its
  sharding and rebatching are done by then and do not read them.

And of the Keras calls that distribute them, for `tfpar/_keras_build.py`:

- Keras's data adapters `ArrayDataAdapter` and `TFDatasetAdapter`, and the
  epoch iterator's `data_adapter` (`fed_from_python`): every other adapter
  (generators, `PyDataset`, and those of other frameworks' loaders) feeds
  Python's arrays through `tf.data.Dataset.from_generator`, and those
  tensors share the arrays' memory, which ops can then overwrite.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter
from tensorflow.python.distribute import input_lib as _input_lib

# Keras's adapters that build their tf.data pipeline from tensors, not Python.
_TENSOR_ADAPTERS = (ArrayDataAdapter, TFDatasetAdapter)


class _DistributedDatasetWithoutDeviceAutotune(_input_lib.DistributedDataset):
    """A stock distributed dataset whose per-device iterators do not autotune."""

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        # Inside a `tf.function` the iterators are graph ops, built per trace.
        if tf.executing_eagerly():
            for worker_iterator in iterator._iterators:
                _rebuild_device_iterators(worker_iterator._iterator)
        return iterator


def _rebuild_device_iterators(devices_iterator: Any) -> None:
    """Rebuilds, without autotuning, the per-device iterators of this process.

    A worker reading without copying to devices has none. Iterators on
    another process's devices (the single-client strategy over cluster
    workers) are left as TensorFlow built them: built again there, they are
    not initialized when the step reads them (remote eager ops are
    asynchronous), and with a wait for them the epoch boundaries measured
    no shorter (`docs/multi_worker.md`, "Not yet, and left as it is").
    """
    device_iterators = getattr(devices_iterator, "_device_iterators", None)
    if device_iterators is None:
        return
    options = tf.data.Options()
    options.autotune.enabled = False
    source = _task_of(devices_iterator._source_device)
    for index, device in enumerate(devices_iterator._devices):
        if _task_of(device) != source:
            continue
        dataset = device_iterators[index]._dataset
        with tf.device(device):
            device_iterators[index] = iter(dataset.with_options(options))


def _task_of(device: str) -> tuple[Any, Any, Any]:
    """The (job, replica, task) of a device name; `None`s where it has none."""
    spec = tf.DeviceSpec.from_string(device)
    return spec.job, spec.replica, spec.task


def without_device_autotune(distributed: Any) -> Any:
    """Turns tf.data's autotuning off on `distributed`'s per-device iterators.

    Args:
        distributed: What a stock `experimental_distribute_dataset` returned.

    Returns:
        `distributed`, whose iterators, made in eager mode, copy elements to
        the devices through iterators that do not autotune, or, where its
        one replica device is its host (`reads_in_place`), read through one
        plain iterator; anything but a stock `DistributedDataset` is
        returned unchanged.

    Example:

    ```python
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dataset = tf.data.Dataset.range(8).batch(4)
    distributed = without_device_autotune(
        strategy.experimental_distribute_dataset(dataset)
    )
    ```
    """
    if type(distributed) is _input_lib.DistributedDataset:
        # The object was made for this call alone: no one else holds it.
        distributed.__class__ = _DistributedDatasetWithoutDeviceAutotune
        if reads_in_place(distributed):
            # TensorFlow's mode for a replica reading where its dataset lives;
            # the user's other options stand.
            options = distributed._options or tf.distribute.InputOptions()
            distributed._options = options._replace(
                experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA,
                experimental_fetch_to_device=False,
            )
    return distributed


def reads_in_place(distributed: Any) -> bool:
    """Whether a stock distributed dataset's one replica device is its host.

    Args:
        distributed: A stock `DistributedDataset`.

    Returns:
        `True` if one worker reads it, for one replica on that worker's host
        device: a plain tf.data iterator then feeds the replica, with nothing
        to copy.
    """
    workers = distributed._input_workers
    if workers.num_workers != 1:
        return False
    devices = workers.compute_devices_for_worker(0)
    return len(devices) == 1 and _canonical(devices[0]) == _canonical(
        workers.worker_devices[0]
    )


def _canonical(device: str) -> str:
    """`device` in one spelling (`/cpu:0` and `/device:CPU:0` alike).

    TensorFlow names a worker's host without its replica
    (`/job:worker/task:0/device:CPU:0`) and its compute devices with it
    (`/job:worker/replica:0/task:0/...`): a missing replica is replica 0.
    """
    spec = tf.DeviceSpec.from_string(device)
    return spec.replace(replica=spec.replica or 0).to_string()


def fed_from_python(epoch_iterator: Any) -> bool:
    """Whether Keras's epoch iterator feeds batches of Python's arrays.

    Args:
        epoch_iterator: Keras's epoch iterator (from `KerasCaller`), or `None`.

    Returns:
        `True` unless its data adapter builds the batches from tensors
        (NumPy arrays given whole, a `tf.data.Dataset`) or is unknown.
    """
    adapter = getattr(epoch_iterator, "data_adapter", None)
    return adapter is not None and not isinstance(adapter, _TENSOR_ADAPTERS)
