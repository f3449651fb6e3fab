"""Pipeline x data parallel: stage replicas, their devices and what they refuse.

`PipelineStrategy(devices=[[d00, d01], [d10, d11]])` gives every stage R
replicas: `devices[s][r]` is replica r of stage s, and replica group r
(`devices[0][r], ..., devices[K - 1][r]`) is one whole pipeline, which runs
micro-batches j with `j % R == r`. A stage's variables stay on its replica 0;
the other replicas run on a per-step snapshot of them and send their summed
weight gradients back (`engine.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tfpar.devices import resolve_devices
from tfpar.strategies.pipeline.layer_graph import nested_layers

# Replica r's seed generators draw from their seed plus r times this (odd,
# large) offset, so replicas never reuse replica 0's Dropout masks.
SEED_OFFSET = 1_000_003


def resolve_stage_devices(
    devices: Sequence[str] | Sequence[Sequence[str]] | None,
) -> tuple[tuple[str, ...], ...]:
    """Validates `devices` and returns, per stage, its replicas' canonical names.

    Args:
        devices: `None` (`tfpar.default_devices()`, one replica per stage), a
            list of device names (one per stage), or a list of lists, one per
            stage, each naming that stage's R replicas (the same R for every
            stage).

    Returns:
        One tuple per stage, replica 0 first.

    Raises:
        TypeError: If `devices` mixes names and lists, or holds neither.
        ValueError: If a stage's list is empty, the lists differ in length, or
            a device is unknown or named twice (anywhere in `devices`).

    Example:

    ```python
    resolve_stage_devices([["/cpu:0", "/cpu:2"], ["/cpu:1", "/cpu:3"]])
    # (('/device:CPU:0', '/device:CPU:2'), ('/device:CPU:1', '/device:CPU:3'))
    ```
    """
    if devices is None or isinstance(devices, str):
        return tuple((d,) for d in resolve_devices(devices))
    nested = [isinstance(d, (list, tuple)) for d in devices]
    if not any(nested):
        return tuple((d,) for d in resolve_devices(devices))  # type: ignore[arg-type]
    if not all(nested):
        raise TypeError(
            "`devices` must be a list of device names (one per stage) or a list "
            "of lists (one per stage, each naming the stage's replicas), not a "
            f"mix. Received: devices={list(devices)!r}."
        )
    counts = [len(stage) for stage in devices]
    if min(counts) == 0 or len(set(counts)) > 1:
        raise ValueError(
            "`devices` must give every stage the same number of replicas, at "
            f"least 1. Received: devices={list(devices)!r} (replicas per stage: "
            f"{counts})."
        )
    flat = resolve_devices([d for stage in devices for d in stage])
    r = counts[0]
    return tuple(tuple(flat[s * r : (s + 1) * r]) for s in range(len(devices)))


def check_replica_count(num_microbatches: int, num_replicas: int) -> None:
    """Refuses fewer micro-batches than replica groups (a group would idle).

    Args:
        num_microbatches: Micro-batches per batch, M.
        num_replicas: Replicas per stage, R.

    Raises:
        ValueError: If `num_microbatches < num_replicas`.

    Example:

    ```python
    check_replica_count(4, 2)  # fine: two micro-batches per group
    check_replica_count(1, 2)  # ValueError naming num_microbatches=1
    ```
    """
    if num_microbatches < num_replicas:
        raise ValueError(
            "`num_microbatches` must be at least the number of replicas per stage "
            f"({num_replicas}): replica group r runs micro-batches j with "
            f"j % {num_replicas} == r. Received: num_microbatches="
            f"{num_microbatches}."
        )


def check_replicable(chunks: Sequence[keras.Model], num_replicas: int) -> None:
    """Refuses layers whose state replicas r > 0 would drop.

    Replicas r > 0 run on a snapshot of the stage's variables and their state
    updates are discarded: a `BatchNormalization`'s moving statistics would
    only see replica 0's micro-batches. (Losses layers add in their call are
    collected on every replica and trained, `engine.py`.)

    Args:
        chunks: The model's stage (or chunk) sub-models.
        num_replicas: Replicas per stage, R.

    Raises:
        ValueError: With R > 1, for a `BatchNormalization` layer (named).

    Example:

    ```python
    table, chunks = partition_model(model, devices)
    check_replicable(chunks, num_replicas=2)
    ```
    """
    if num_replicas == 1:
        return
    names = [
        layer.name
        for chunk in chunks
        for layer in nested_layers(chunk)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if names:
        raise ValueError(
            f"PipelineStrategy with {num_replicas} replicas per stage cannot train "
            f"the BatchNormalization layer(s) {names}: their moving statistics "
            "would be updated by replica 0's micro-batches only. Use one device "
            "per stage, or a normalization without moving statistics "
            "(LayerNormalization, GroupNormalization)."
        )
