"""Host timestamps inside a step that are taken when their inputs exist.

tf.function's automatic control dependencies run every stateful op that
takes no resource in program order, across devices, and `tf.timestamp()` is
one: a step's timestamps become one chain, so a timestamp waiting for one
replica's gradients also delays every timestamp traced after it. Measured
here: of two timestamps, one after a 25 ms matmul chain and one after a
constant, the second read 2 us later than the first; taken as below, 25 ms
earlier. In a pipeline over two cluster workers the chain made each worker
wait for the other at every action: two workers ran 0.70x of one, 1.18x
without it (docs/pipeline.md). An op that takes a resource is ordered only against writes to that
resource, so each timestamp is taken in a small function reading a variable
of the clock's own that nothing writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf


class UnorderedClock:
    """`tf.timestamp()` on one device, outside the program-order chain.

    Create it eagerly or while tracing: its variable is made in an init scope.

    Args:
        device: The device whose host takes the timestamps.

    Example:

    ```python
    clock = UnorderedClock("/device:CPU:0")

    @tf.function
    def step(x):
        y = tf.matmul(x, x)
        with tf.control_dependencies([y]):
            return y, clock()  # when y exists, whatever was traced before
    ```
    """

    def __init__(self, device: str) -> None:
        with tf.init_scope(), tf.device(device):
            self._anchor = tf.Variable(0.0, trainable=False, name="tfpar_clock")
        self._now = tf.function(self._timestamp, autograph=False)

    def _timestamp(self) -> tf.Tensor:
        return tf.timestamp() + tf.cast(0.0 * self._anchor, tf.float64)

    def __call__(self) -> tf.Tensor:
        """Returns the time in seconds, as `tf.timestamp()`."""
        return self._now()


class HostClocks:
    """One `UnorderedClock` per host, made on first use.

    Example:

    ```python
    clocks = HostClocks()
    ready = clocks.after(gradients, "/device:GPU:1")  # on GPU 1's host CPU
    ```
    """

    def __init__(self) -> None:
        self._clocks: dict[str, UnorderedClock] = {}

    def after(self, tensors: Sequence[Any], device: str) -> tf.Tensor:
        """A timestamp on `device`'s host CPU, taken once `tensors` all exist."""
        spec = tf.DeviceSpec.from_string(device)
        if spec.device_type != "CPU":
            spec = spec.replace(device_type="CPU", device_index=0)
        host = spec.to_string()
        if host not in self._clocks:
            self._clocks[host] = UnorderedClock(host)
        deps = [t.values if isinstance(t, tf.IndexedSlices) else t for t in tensors]
        with tf.device(host), tf.control_dependencies(deps):
            return self._clocks[host]()
