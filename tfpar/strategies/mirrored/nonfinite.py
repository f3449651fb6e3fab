"""`on_nonfinite` of tfpar's strategies: skip or stop on NaN or Inf gradients.

The mirrored strategies decide on the reduced gradients, which every replica
holds equal: each replica tests its own copy and all reach the same answer
without another exchange. A replica's own gradients (before the reduction)
only say who caused it, in the error of `"raise"`. A pipeline's stages hold
different gradients, so their verdicts are combined into one (`apply_across`):
the whole step is skipped, or stops, when any stage's gradients are not finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf


class NonFinitePolicy:
    """Applies `on_nonfinite` to the outputs of one reduction (graph ops).

    Args:
        policy: `None` (no check), `"skip"` (zero gradients for the step) or
            `"raise"` (an `InvalidArgumentError` when the step runs).
        devices: The replica devices, in replica order (named by `"raise"`),
            or, for `apply_across`, one device per group.
        owner: The strategy named by `"raise"`'s error. Defaults to
            `"tfpar.MirroredStrategy"`.

    Example:

    ```python
    policy = NonFinitePolicy("skip", ["/device:CPU:0", "/device:CPU:1"])
    # Inside a traced step, on the all-reduced gradients of each replica:
    outputs, skipped = policy.apply(inputs, outputs, devices)
    ```
    """

    def __init__(
        self,
        policy: str | None,
        devices: Sequence[str],
        owner: str = "tfpar.MirroredStrategy",
    ) -> None:
        self._policy = policy
        self._devices = tuple(devices)
        self._prefix = f"{owner} with on_nonfinite=raise: the "

    @property
    def policy(self) -> str | None:
        """The policy: `None`, `"skip"` or `"raise"`."""
        return self._policy

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

    def apply_across(
        self, groups: Sequence[Sequence[Any]], verdict_device: str
    ) -> tuple[list[list[Any]], Any]:
        """Checks tensors that differ between groups, with one verdict for all.

        Each group (a pipeline stage's gradients) is tested on its own device
        (`devices[g]`); the verdicts are combined on `verdict_device`, and a
        step is skipped, or stops, when any group holds a NaN or Inf: one
        stage never updates while another skips.

        Args:
            groups: Per group, its tensors (dense or `IndexedSlices`).
            verdict_device: Where the groups' verdicts are combined.

        Returns:
            The groups' tensors (zeroed on a skipped step, or depending on the
            check), and a float64 scalar: 1.0 if the step is skipped, else 0.0.

        Example:

        ```python
        policy = NonFinitePolicy(
            "skip", ["/device:CPU:0", "/device:CPU:1"], owner="tfpar.PipelineStrategy"
        )
        # Inside a traced step, stage s's gradients on devices[s]:
        checked, skipped = policy.apply_across(
            [stage_0_grads, stage_1_grads], verdict_device="/device:CPU:1"
        )
        ```
        """
        unchanged = tf.constant(0.0, tf.float64)
        if self._policy is None:
            return [list(g) for g in groups], unchanged
        flags = []
        for tensors, device in zip(groups, self._devices, strict=True):
            with tf.device(device):
                flags.append(_all_finite(tensors))
        with tf.device(verdict_device):
            each = tf.stack(flags)
            ok = tf.reduce_all(each)
        if self._policy == "skip":
            zeroed = [[_zero_unless(ok, t) for t in tensors] for tensors in groups]
            return zeroed, 1.0 - tf.cast(ok, tf.float64)
        with tf.device(verdict_device):
            culprits = tf.strings.reduce_join(
                tf.boolean_mask(tf.constant(self._devices), tf.logical_not(each)),
                separator=", ",
            )
            check = tf.debugging.Assert(
                ok,
                [self._prefix + "gradients hold NaN or Inf on:", culprits],
                name="tfpar_nonfinite_gradients",
            )
        with tf.control_dependencies([check]):
            return [[_identity(t) for t in tensors] for tensors in groups], unchanged

    def _message(
        self, inputs: Sequence[Sequence[Any]], replica_id: int | None
    ) -> list[Any]:
        """The error's text; a replica context knows only its own gradients."""
        if replica_id is not None:
            return [
                self._prefix
                + f"all-reduced gradients hold NaN or Inf. Replica {replica_id}'s "
                "own gradients were finite:",
                _all_finite(inputs[0]),
            ]
        local = tf.stack([_all_finite(tensors) for tensors in inputs])
        culprits = tf.strings.reduce_join(
            tf.boolean_mask(tf.constant(self._devices), tf.logical_not(local)),
            separator=", ",
        )
        return [
            self._prefix
            + "all-reduced gradients hold NaN or Inf. Replica(s) whose own gradients "
            "were not finite:",
            culprits,
        ]


def _zero_unless(ok: Any, t: Any) -> Any:
    """`t` if `ok`, else zeros (`where`, since NaN * 0 is still NaN)."""
    if isinstance(t, tf.IndexedSlices):
        return tf.IndexedSlices(_zero_unless(ok, t.values), t.indices, t.dense_shape)
    with tf.device(t.device):
        return tf.where(ok, t, tf.zeros_like(t))


def _identity(t: Any) -> Any:
    """`t` behind the control dependencies in scope (dense or slices)."""
    if isinstance(t, tf.IndexedSlices):
        return tf.IndexedSlices(tf.identity(t.values), t.indices, t.dense_shape)
    return tf.identity(t)


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
