"""The few TensorFlow internals `tfpar.MirroredStrategy` cannot avoid.

Why each one is needed (no public path exists in TensorFlow 2.21):

- `values.PerReplica` and `values.Mirrored`: a `CrossDeviceOps` subclass that
  compresses or packs gradients must hand the wrapped algorithm new per-replica
  values and return mirrored ones; `tf.distribute` exposes only the abstract
  `DistributedValues`, with no constructor.
- `MirroredExtended._collective_ops`: the stock strategy's default reduction
  (collective all-reduce with its group keys, ring on CPUs, NCCL on GPUs,
  reduction to one device on mixed devices) is built inside the constructor and
  only kept there. Wrapping that very object is what makes the tfpar strategy
  bit-identical to the stock one; building our own would need the private
  `CollectiveAllReduce` class and the strategy's private collective keys.
- `MirroredStrategy._collective_key_base`: every stock `MirroredStrategy` in a
  process starts its collective group keys at 1, so two strategies over the
  same devices share collective instance keys. When their tensors differ in
  dtype (a compressed bf16 reduction after a float32 one) TensorFlow aborts
  all collectives of the process ("Collective instance 100 expected ...
  data_type 1 but got ... data_type 14"). Each tfpar strategy gets its own base.
- Keras's `TensorFlowTrainer._maybe_symbolic_build`: it averages the first
  distributed batch over the replicas (`strategy.reduce("MEAN", batch,
  axis=None)`) only to get shapes for building the model, which fails with an
  AddN shape error when that batch does not split evenly (keras-team/keras
  issue 19246). `called_from_keras_symbolic_build` recognizes that one caller,
  so the strategy can answer it and still reject the same call from user code.

`tests/strategies/test_mirrored.py::test_private_tensorflow_internals_exist`
fails loudly if an upgrade removes any of them.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from tensorflow.python.distribute import values as _values

# Far above the group keys any stock strategy of the process uses (1, 2, ...).
_KEY_BASES = itertools.count(start=10_000, step=10_000)


def per_replica(tensors: Sequence[Any]) -> tf.distribute.DistributedValues:
    """Wraps one tensor per replica (in replica order) as a `PerReplica`."""
    return _values.PerReplica(tuple(tensors))


def mirrored(tensors: Sequence[Any]) -> tf.distribute.DistributedValues:
    """Wraps one equal tensor per replica (in replica order) as `Mirrored`."""
    return _values.Mirrored(tuple(tensors))


def stock_default_cross_device_ops(
    extended: tf.distribute.StrategyExtended,
) -> tf.distribute.CrossDeviceOps:
    """Returns the reduction a stock `MirroredStrategy` uses by default."""
    return extended._collective_ops


def reserve_collective_keys(strategy: tf.distribute.MirroredStrategy) -> None:
    """Gives `strategy` collective group keys no other strategy uses.

    Must run before `MirroredStrategy.__init__`, which reads the base.
    """
    strategy._collective_key_base = next(_KEY_BASES)


def called_from_keras_symbolic_build() -> bool:
    """Whether the running `Strategy.reduce` was called by Keras's model build."""
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(6):  # reduce() -> our override -> Keras, with slack.
        if frame is None:
            return False
        if frame.f_code.co_name == "_maybe_symbolic_build" and "keras" in (
            frame.f_code.co_filename
        ):
            return True
        frame = frame.f_back
    return False
