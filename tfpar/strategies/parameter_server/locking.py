"""Optimizer updates that stay consistent when several workers apply them.

A Keras 3 optimizer updates a variable and its slots with separate ops: Adam
adds to its first moment `m`, then to its second moment `v`, then reads both
to move the variable by `lr * m / (sqrt(v) + epsilon)`. Under a parameter
server, two workers run these ops on the same variables at the same time, and
the ops interleave. A worker can then read another worker's new `m` next to
the old `v`: for an embedding row seen for the first time, `v` is still 0, and
the row jumps by about `m / epsilon` (1e7 times too far). This was measured:
an embedding of 20,000 rows under Adam(0.01) on 2 workers moved by 123 in one
128-step epoch, where with consistent updates no weight moved more than 0.4.

(tf-keras 2 applied each variable's Adam update as one fused kernel, so this
was new with Keras 3.) `lock_optimizer_updates` restores that consistency the
way TensorFlow 1's `use_locking` did: one mutex per variable, on the variable's
own parameter server (`tf.raw_ops.MutexV2`, as `tf.CriticalSection` uses);
each worker's update of that variable and its slots runs while holding it.
Updates of different variables still run concurrently, and so do the forward
and backward passes, which take the time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

# Marks a wrapped `update_step` (an attribute of the function, not of the
# optimizer: the optimizer's attributes are tracked for checkpoints).
_LOCKED = "_tfpar_locked"


def lock_optimizer_updates(optimizer: keras.optimizers.Optimizer) -> None:
    """Makes each variable's update by `optimizer` one critical section.

    Wraps the optimizer's public `update_step` on this instance only; other
    optimizers, the optimizer's class and its saved config are unchanged.
    A `LossScaleOptimizer` applies through its inner optimizer, whose
    updates are the ones locked. With `gradient_accumulation_steps`, the
    whole `apply` (reading the step count, adding to the accumulators or
    updating the variables and resetting them, counting the step) is one
    critical section of the optimizer, on its step counter's parameter
    server: otherwise two workers could both add to the accumulators with
    the same count, and no update (or a double one) follows. Calling it
    again does nothing.

    Args:
        optimizer: The Keras optimizer of a model trained under
            `tfpar.ParameterServerStrategy`.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    mutexes: dict[int, tuple[Any, Any, str]] = {}
    update_step: Callable[..., Any] = optimizer.update_step
    if not getattr(update_step, _LOCKED, False):

        def locked_update_step(gradient: Any, variable: Any, learning_rate: Any) -> Any:
            mutex, device = _mutex_of(mutexes, variable)
            return _locked(
                mutex,
                device,
                (gradient, learning_rate),
                lambda: update_step(gradient, variable, learning_rate),
            )

        setattr(locked_update_step, _LOCKED, True)
        optimizer.update_step = locked_update_step
    apply: Callable[..., Any] = optimizer.apply
    if optimizer.gradient_accumulation_steps and not getattr(apply, _LOCKED, False):

        def locked_apply(grads: Any, trainable_variables: Any = None) -> Any:
            mutex, device = _mutex_of(mutexes, _step_counter(optimizer))
            return _locked(
                mutex, device, grads, lambda: apply(grads, trainable_variables)
            )

        setattr(locked_apply, _LOCKED, True)
        optimizer.apply = locked_apply


def _step_counter(optimizer: keras.optimizers.Optimizer) -> Any:
    """The `tf.Variable` counting `optimizer`'s steps (`iterations` counts updates)."""
    counter = next(v for v in optimizer.variables if v.name == "iteration")
    return counter.value


def _locked(mutex: Any, device: str, inputs: Any, call: Callable[[], Any]) -> Any:
    """Runs `call()`'s ops while holding `mutex`, taken once `inputs` exist."""
    if tf.executing_eagerly():
        lock = tf.raw_ops.MutexLock(mutex=mutex)
        try:
            return call()
        finally:
            del lock  # deleting the lock releases the mutex
    graph = tf.compat.v1.get_default_graph()
    # Locked once the gradient is there, not from the start of the step:
    # held only while updating, never while waiting for a worker.
    flat = tf.nest.flatten(inputs, expand_composites=True)
    ready = [t for t in flat if isinstance(t, tf.Tensor)]
    # Both on the mutex's device: a lock (a variant tensor) cannot be sent
    # between tasks, and a sharded variable's update has no device scope.
    with tf.control_dependencies(ready), tf.device(device):
        lock = tf.raw_ops.MutexLock(mutex=mutex)
    existing = len(graph.get_operations())
    with tf.control_dependencies([lock]):
        result = call()
    # Release only once every op of the update ran (reads included).
    update_ops = graph.get_operations()[existing:]
    with tf.control_dependencies(update_ops), tf.device(device):
        tf.raw_ops.ConsumeMutexLock(mutex_lock=lock)
    return result


def _mutex_of(
    mutexes: dict[int, tuple[Any, Any, str]], variable: Any
) -> tuple[Any, str]:
    """The mutex of `variable`, on its (first shard's) device, and that device."""
    entry = mutexes.get(id(variable))
    if entry is None:
        shards = getattr(variable, "variables", None)  # a ShardedVariable
        device = shards[0].device if shards else variable.device
        # Created eagerly, like a variable, even while a function is traced.
        # A unique shared name: with none, every MutexV2 on a device is the
        # same mutex (and a step locking two of them deadlocks).
        name = f"tfpar_update_mutex_{uuid.uuid4().hex}"
        with tf.init_scope(), tf.device(device):
            entry = (variable, tf.raw_ops.MutexV2(shared_name=name), device)
        mutexes[id(variable)] = entry
    return entry[1], entry[2]
