"""The objects whose class tfpar changes, listed in one place, and how.

tfpar never replaces a TensorFlow or Keras function, class or logger for the
whole process. Where a behaviour must change, it changes on single objects
that tfpar's own strategies create or own, by moving each object to a
subclass of its class. Every such subclass says it is tfpar's: a subclass
made by `use_overrides` keeps the class's `__name__` and `__module__` (Keras
saves layers by those, so saved models still load without tfpar) but its
`__qualname__` ends in `[tfpar:<swap>]`; a subclass written out in tfpar
(`swap_class`) has tfpar's module and its own name. `OBJECT_SWAPS` lists
every swap; both functions refuse a swap it does not list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ObjectSwap:
    """One kind of object whose class tfpar changes.

    Attributes:
        name: The swap's name, as passed to `use_overrides` or `swap_class`.
        objects: Which objects change class, and when.
        subclass: Where the subclass is made or defined.
        why: What the subclass changes, and why no public hook does it.
    """

    name: str
    objects: str
    subclass: str
    why: str


OBJECT_SWAPS: tuple[ObjectSwap, ...] = (
    ObjectSwap(
        name="atomic_updates",
        objects="The Keras variables (weights, metric and optimizer variables) "
        "of a model trained under tfpar.ParameterServerStrategy, at its first "
        "step.",
        subclass="tfpar._compat.parameter_server.make_updates_atomic",
        why="Keras 3's Variable.assign_add/assign_sub read then write, which "
        "loses concurrent updates from several workers; TensorFlow's own "
        "assign_add is one atomic op on the parameter server.",
    ),
    ObjectSwap(
        name="sharded_lookup",
        objects="keras.layers.Embedding layers whose table is sharded over "
        "parameter servers, in a model trained under "
        "tfpar.ParameterServerStrategy, at its first step.",
        subclass="tfpar.strategies.parameter_server.sharding.prepare_sharded_model",
        why="Keras's Embedding.call gathers with ops.take, which first "
        "concatenates the whole table on the worker; the override gathers "
        "only the needed rows on each shard's parameter server.",
    ),
    ObjectSwap(
        name="ps_extended",
        objects="The `extended` object of each tfpar.ParameterServerStrategy, "
        "right after TensorFlow created it.",
        subclass="tfpar._compat.parameter_server.TfparParameterServerExtended "
        "(tfpar._compat.sharding.TfparShardedExtended with a "
        "variable_partitioner)",
        why="TensorFlow warns that a strategy method runs unscheduled when "
        "tfpar's scheduled callables trace their step on a coordinator worker "
        "thread; and sharded variables need their own variable class, update "
        "placement and slot creation. The strategy class itself stays "
        "TensorFlow's subclass API.",
    ),
    ObjectSwap(
        name="trainable_sharded_variable",
        objects="Each ShardedVariable created by a tfpar.ParameterServerStrategy "
        "with a variable_partitioner.",
        subclass="tfpar._compat.sharding.TfparTrainableShardedVariable",
        why="Keras differentiates, converts and checkpoints a variable as one "
        "resource handle and one array, which a ShardedVariable lacks.",
    ),
    ObjectSwap(
        name="coordinator_worker",
        objects="The Worker objects of the ClusterCoordinator of each "
        "tfpar.ParameterServerStrategy, right after it is created.",
        subclass="tfpar._compat.cluster.TfparCoordinatorWorker",
        why="Each closure's executor_scope exit waits on the thread's previous "
        "executor; on the default executor that wait blocks forever behind "
        "remote-tensor deletions sent to a frozen worker. Each worker thread "
        "is moved onto its own executor first, so the wait is on that one.",
    ),
)

_NAMES = frozenset(swap.name for swap in OBJECT_SWAPS)


def _check_listed(swap: str) -> None:
    if swap not in _NAMES:
        raise ValueError(
            f"Object swap {swap!r} is not listed in tfpar._subclass.OBJECT_SWAPS."
        )


def use_overrides(
    obj: object, swap: str, overrides: Mapping[str, Any], cache: dict[type, type]
) -> None:
    """Moves `obj` to a subclass of its class that has `overrides`.

    The subclass keeps the class's name and module, so error messages and
    saved configs still name the original class; its qualified name is the
    class's with `[tfpar:<swap>]` appended. It is made once per class and kept
    in `cache` (one cache per swap). An object already moved is left as is.

    Args:
        obj: The object (a Keras variable or layer).
        swap: The name of the swap in `OBJECT_SWAPS`.
        overrides: Attributes of the subclass, by name.
        cache: Subclasses made for this swap, by original class.

    Raises:
        ValueError: If `swap` is not listed in `OBJECT_SWAPS`.
    """
    _check_listed(swap)
    cls = type(obj)
    if cls in cache.values():
        return
    subclass = cache.get(cls)
    if subclass is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}[tfpar:{swap}]",
            "_tfpar_swap": swap,
            **overrides,
        }
        subclass = type(cls.__name__, (cls,), namespace)
        cache[cls] = subclass
    obj.__class__ = subclass


def swap_class(obj: object, swap: str, subclass: type) -> None:
    """Moves `obj` to `subclass`, a tfpar subclass of exactly its class.

    Args:
        obj: The object.
        swap: The name of the swap in `OBJECT_SWAPS`.
        subclass: A class defined in tfpar whose direct base is `obj`'s class.

    Raises:
        ValueError: If `swap` is not listed in `OBJECT_SWAPS`.
        TypeError: If `subclass` is not tfpar's, or `obj`'s class is not its
            direct base (another swap or a user subclass came first).
    """
    _check_listed(swap)
    if type(obj) is subclass:
        return
    if not subclass.__module__.startswith("tfpar.") or type(obj) not in (
        subclass.__bases__
    ):
        raise TypeError(
            f"Cannot move a {type(obj).__qualname__} to {subclass.__module__}."
            f"{subclass.__qualname__}: it must be a tfpar subclass of exactly "
            "that class."
        )
    obj.__class__ = subclass
