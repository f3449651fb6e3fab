"""Public names loaded on first use, so one broken area leaves the rest importable.

Each strategy family relies on private TensorFlow and Keras internals
(`tfpar/_compat/`). Importing a family only when its first public name is
read means an upgrade that breaks one area fails that strategy, with an
error naming the versions, while `import tfpar`, the callbacks and the other
strategies keep working.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from tfpar._compat import SUPPORTED


def load(package: str, name: str, modules: Mapping[str, str]) -> Any:
    """Returns the public `name` of `package`, importing its module now.

    Args:
        package: The package whose `__getattr__` asks, e.g. `"tfpar"`.
        name: The attribute asked for.
        modules: The module that defines each lazily loaded name.

    Raises:
        AttributeError: If `name` is not one of `modules`.
        ImportError: If its module cannot be imported; the message names the
            installed TensorFlow and Keras and the range tfpar supports.
    """
    module = modules.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ImportError(_explain(f"{package}.{name}", error)) from error


def _explain(what: str, error: BaseException) -> str:
    import keras
    import tensorflow as tf

    installed = f"TensorFlow {tf.__version__} and Keras {keras.__version__}"
    supported = ", ".join(f"{k}{v}" for k, v in SUPPORTED.items())
    return (
        f"{what} cannot be loaded: {type(error).__name__}: {error}. It relies on "
        f"private TensorFlow and Keras internals checked against {supported}; "
        f"this process has {installed}. Install a supported release (the rest "
        "of tfpar still works), or, if these are supported, report a bug."
    )
