"""Tripwires: a failure here names the TensorFlow and Keras that changed."""

from collections.abc import Generator
from typing import Any

import keras
import pytest
import tensorflow as tf

from tfpar._compat import SUPPORTED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        supported = ", ".join(f"{k}{v}" for k, v in SUPPORTED.items())
        report.sections.append(
            (
                "tfpar tripwire",
                f"A private internal that tfpar relies on changed in TensorFlow "
                f"{tf.__version__} / Keras {keras.__version__} (tfpar checks "
                f"{supported}); see the module docstring of the tfpar/_compat "
                "area this test file is named after.",
            )
        )
