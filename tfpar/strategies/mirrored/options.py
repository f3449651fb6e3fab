"""`AllReduceOptions`: how `tfpar.MirroredStrategy` reduces gradients, validated."""

from __future__ import annotations

import dataclasses

ALL_REDUCE_CHOICES = (
    "auto",
    "collective",
    "nccl",
    "hierarchical_copy",
    "reduce_to_one_device",
)
COMPRESSION_CHOICES = (None, "fp16", "bf16")
ON_NONFINITE_CHOICES = (None, "skip", "raise")


@dataclasses.dataclass(frozen=True)
class AllReduceOptions:
    """How `tfpar.MirroredStrategy` reduces gradients.

    Args:
        all_reduce: Algorithm: `"auto"` (default: what the stock strategy
            picks, TensorFlow's collective all-reduce, ring on CPUs and NCCL on
            GPUs, reduction to one device when CPUs and GPUs are mixed),
            `"collective"`, `"nccl"` (GPUs only), `"hierarchical_copy"` or
            `"reduce_to_one_device"`.
        compression: `None` (default), `"fp16"` or `"bf16"`: float32/float64
            gradients are cast down for the reduction and back up after it.
        bucket_bytes: `None` (default: one reduction per gradient, as stock)
            or a positive int: dense gradients of one dtype are packed, in
            order, into buckets of at most this many bytes (a larger gradient
            gets its own bucket), reducing the number of reduction calls.
        on_nonfinite: `None` (default: no check), `"skip"` (a step whose
            reduced gradients hold a NaN or Inf applies zero gradients and is
            counted) or `"raise"` (it fails with `InvalidArgumentError`).
        measure: Whether to add the timing and byte-counting ops (default
            `True`).

    Raises:
        ValueError: If a value is not one of those allowed.
        TypeError: If `bucket_bytes` or `measure` has the wrong type.

    Example:

    ```python
    options = AllReduceOptions(compression="bf16", bucket_bytes=4 << 20)
    ```
    """

    all_reduce: str = "auto"
    compression: str | None = None
    bucket_bytes: int | None = None
    on_nonfinite: str | None = None
    measure: bool = True

    def __post_init__(self) -> None:
        _check_choice("all_reduce", self.all_reduce, ALL_REDUCE_CHOICES)
        _check_choice("compression", self.compression, COMPRESSION_CHOICES)
        _check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE_CHOICES)
        if self.bucket_bytes is not None and (
            isinstance(self.bucket_bytes, bool)
            or not isinstance(self.bucket_bytes, int)
        ):
            raise TypeError(
                "`bucket_bytes` must be None or a positive int. Received: "
                f"bucket_bytes={self.bucket_bytes!r} of type "
                f"{type(self.bucket_bytes).__name__}."
            )
        if self.bucket_bytes is not None and self.bucket_bytes <= 0:
            raise ValueError(
                "`bucket_bytes` must be None or a positive int. Received: "
                f"bucket_bytes={self.bucket_bytes!r} (must be > 0)."
            )
        if not isinstance(self.measure, bool):
            raise TypeError(
                f"`measure` must be a bool. Received: measure={self.measure!r}."
            )


def _check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if isinstance(value, str | type(None)) and value in allowed:
        return
    raise ValueError(
        f"Unknown `{name}`. Received: {name}={value!r} (must be one of "
        f"{', '.join(repr(a) for a in allowed)})."
    )
