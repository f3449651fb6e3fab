"""`on_nonfinite` of `tfpar.MirroredStrategy`: skip or stop on NaN or Inf gradients.

The decision is taken on the reduced gradients, which every replica holds
equal: each replica tests its own copy and all reach the same answer without
another exchange. A replica's own gradients (before the reduction) only say
who caused it, in the error of `"raise"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

_PREFIX = "tfpar.MirroredStrategy with on_nonfinite=raise: the all-reduced "


class NonFinitePolicy:
    """Applies `on_nonfinite` to the outputs of one reduction (graph ops).

    Args:
        policy: `None` (no check), `"skip"` (zero gradients for the step) or
            `"raise"` (an `InvalidArgumentError` when the step runs).
        devices: The replica devices, in replica order (named by `"raise"`).
    """

    def __init__(self, policy: str | None, devices: Sequence[str]) -> None:
        self._policy = policy
        self._devices = tuple(devices)

    def apply(
        self,
        inputs: Sequence[Sequence[Any]],
        outputs: Sequence[Sequence[Any]],
        devices: Sequence[str],
        replica_id: int | None = None,
    ) -> tuple[list[list[Any]], Any]:
        """Checks the reduced `outputs` and skips or guards them.

        Args:
            inputs: Per replica seen, its tensors before the reduction.
            outputs: Per replica seen, its reduced tensors.
            devices: Per replica seen, its device.
            replica_id: The one replica seen in a replica context, or `None`
                when a batch reduction sees every replica.

        Returns:
            The outputs (zeroed on a skipped step, or depending on the check),
            and a float64 scalar: 1.0 if the step is skipped, else 0.0.
        """
        unchanged = tf.constant(0.0, tf.float64)
        if self._policy is None:
            return [list(out) for out in outputs], unchanged
        ok = []
        for out, device in zip(outputs, devices, strict=True):
            with tf.device(device):
                ok.append(_all_finite(out))
        if self._policy == "skip":
            zeroed = [
                [_zero_unless(flag, t) for t in out]
                for flag, out in zip(ok, outputs, strict=True)
            ]
            return zeroed, 1.0 - tf.cast(ok[0], tf.float64)
        check = tf.debugging.Assert(
            ok[0], self._message(inputs, replica_id), name="tfpar_nonfinite_gradients"
        )
        with tf.control_dependencies([check]):
            return [[tf.identity(t) for t in out] for out in outputs], unchanged

    def _message(
        self, inputs: Sequence[Sequence[Any]], replica_id: int | None
    ) -> list[Any]:
        """The error's text; a replica context knows only its own gradients."""
        if replica_id is not None:
            return [
                _PREFIX + f"gradients hold NaN or Inf. Replica {replica_id}'s "
                "own gradients were finite:",
                _all_finite(inputs[0]),
            ]
        local = tf.stack([_all_finite(tensors) for tensors in inputs])
        culprits = tf.strings.reduce_join(
            tf.boolean_mask(tf.constant(self._devices), tf.logical_not(local)),
            separator=", ",
        )
        return [
            _PREFIX + "gradients hold NaN or Inf. Replica(s) whose own gradients "
            "were not finite:",
            culprits,
        ]


def _zero_unless(ok: Any, t: Any) -> Any:
    """`t` if `ok`, else zeros (`where`, since NaN * 0 is still NaN)."""
    with tf.device(t.device):
        return tf.where(ok, t, tf.zeros_like(t))


def _all_finite(tensors: Sequence[Any]) -> Any:
    """A scalar bool: whether every float tensor (or slices) is all finite."""
    flags = [
        tf.reduce_all(
            tf.math.is_finite(t.values if isinstance(t, tf.IndexedSlices) else t)
        )
        for t in tensors
        if t.dtype.is_floating
    ]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)
