"""Models and data shared by tests: small, seeded, the same in every process."""

from __future__ import annotations

from typing import Any

import keras


def mlp(penalized: str | None = None, **regularizers: Any) -> keras.Model:
    """A 6-8-8-8-2 tanh MLP with named layers `d0`..`d2`, `out`; seed 7.

    `regularizers` (`kernel_regularizer=...`, `activity_regularizer=...`)
    go to the hidden layer named `penalized`.
    """
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,))]
        + [
            keras.layers.Dense(
                8,
                activation="tanh",
                name=f"d{i}",
                **(regularizers if f"d{i}" == penalized else {}),
            )
            for i in range(3)
        ]
        + [keras.layers.Dense(2, name="out")]
    )
