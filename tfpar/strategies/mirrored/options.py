"""`AllReduceOptions`: how `tfpar.MirroredStrategy` reduces gradients, validated."""

from __future__ import annotations

import dataclasses

from tfpar._validation import check_bool, check_choice, check_int

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
        bucket_bytes: `None` (default: the gradients go to the algorithm as
            stock hands them over; TensorFlow's collective all-reduce
            concatenates them into one reduction, which starts once the last
            gradient exists) or a positive int: dense gradients of one dtype
            are packed, in order, into buckets of at most this many bytes (a
            larger gradient gets its own bucket). Under the collective
            all-reduce each bucket is then its own collective, launched last
            layer first, so that it runs while the backward pass still
            computes earlier layers' gradients.
        on_nonfinite: `None` (default: no check), `"skip"` (a step whose
            reduced gradients hold a NaN or Inf applies zero gradients and is
            counted) or `"raise"` (it fails with `InvalidArgumentError`).
        measure: Whether to add the timing and byte-counting ops (default
            `True`).

    Raises:
        ValueError: If a value of the right type is not one of those allowed.
        TypeError: If a value has the wrong type (`compression=16`,
            `bucket_bytes=1.5`, `measure="yes"`).

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
        check_choice("all_reduce", self.all_reduce, ALL_REDUCE_CHOICES)
        check_choice("compression", self.compression, COMPRESSION_CHOICES)
        check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE_CHOICES)
        check_int("bucket_bytes", self.bucket_bytes, minimum=1, allow_none=True)
        check_bool("measure", self.measure)
