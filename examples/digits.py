"""The data three examples train on: scikit-learn's digits, or look-alikes.

scikit-learn ships its 1,797 handwritten 8x8 digits inside the package (no
download; `pip install "tfpar[examples]"`). With `synthetic=True`, 1,797
random 8x8 images of 10 classes, each a noisy copy of its class's pattern,
need nothing beyond NumPy (the tests use them).
"""

from __future__ import annotations

import numpy as np


def load_digits(synthetic: bool) -> tuple[np.ndarray, np.ndarray]:
    """1,797 8x8 images in [0, 1] and their labels, 0 to 9.

    Args:
        synthetic: Random look-alikes instead of scikit-learn's digits.

    Returns:
        `(x, y)`: `x` float32 of shape `(1797, 8, 8, 1)`, `y` int32.

    Raises:
        SystemExit: If the digits are asked for and scikit-learn is missing.

    Example:

    ```python
    x, y = load_digits(synthetic=True)
    x.reshape(len(x), -1).shape  # (1797, 64), as examples/pipeline.py uses them
    ```
    """
    if synthetic:
        rng = np.random.default_rng(0)
        patterns = rng.uniform(size=(10, 8, 8, 1))
        y = rng.integers(0, 10, size=1797)
        x = patterns[y] + rng.normal(scale=0.3, size=(1797, 8, 8, 1))
        return x.astype("float32"), y.astype("int32")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise SystemExit(
            "The digits ship with scikit-learn: pip install 'tfpar[examples]', "
            "or pass --synthetic."
        ) from None
    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    return x, digits.target.astype("int32")
