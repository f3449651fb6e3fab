"""Where the model computes: the strategy's devices and each op's device.

`DeviceUtilization` reports the devices a strategy computes on
(`strategy_devices`) plus those the train step placed ops on. The profiler
records the thread an op ran on, not its device: on CPU, `/device:CPU:0` and
`/device:CPU:1` share one thread pool. Each op's device comes instead from
the placed partition graphs TensorFlow builds when it instantiates the train
function (`OpDevices`), which `GraphPlacement` collects once per train
function.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import keras
import tensorflow as tf

from tfpar._compat import callbacks as _compat
from tfpar.devices import canonical_device, default_devices


@dataclasses.dataclass(frozen=True)
class OpDevices:
    """Which device each op of the traced functions was placed on.

    Attributes:
        devices: Op name (as the profiler records it) to canonical device.
            A name placed on several devices (e.g. a `Const` in many
            functions) is left out: it cannot be attributed honestly.
        placed: Number of op names placed on each device, those left out of
            `devices` included. A device with no op placed on it is absent.
            Empty (the default) when the placement is not known.

    Example:

    ```python
    _compat.start_graph_collection()
    model.fit(x, y, steps_per_epoch=1)
    placed = OpDevices.from_run_metadata(_compat.stop_graph_collection())
    ```
    """

    devices: Mapping[str, str]
    placed: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_run_metadata(cls, metadata: tf.compat.v1.RunMetadata) -> OpDevices:
        """Reads the placed partition graphs of every instantiated function.

        Args:
            metadata: What graph collection recorded (`_compat`).

        Returns:
            The op-to-device map, with the number of ops on each device.
        """
        pairs: set[tuple[str, str]] = set()
        canonical: dict[str, str] = {}  # a few device strings, many nodes
        graphs = [g for f in metadata.function_graphs for g in f.partition_graphs]
        for graph in [*graphs, *metadata.partition_graphs]:
            for node in graph.node:
                if not node.device:
                    continue
                if node.device not in canonical:
                    canonical[node.device] = canonical_device(node.device)
                pairs.add((node.name, canonical[node.device]))
        names = collections.Counter(name for name, _ in pairs)
        return cls(
            {name: dev for name, dev in pairs if names[name] == 1},
            dict(collections.Counter(dev for _, dev in pairs)),
        )


class GraphPlacement:
    """Learns where a model's train function runs its ops, at the least cost.

    Placement is recorded only when TensorFlow instantiates a function, which
    happens on its first call. `start` switches graph collection on before
    `fit`'s first step and `finish` reads the graphs after it. The result is
    kept per train function, so a later `fit` with the same function costs
    nothing.

    Example:

    ```python
    placement = GraphPlacement()
    placement.note_model(model)  # from Callback.set_model
    known = placement.start(model, rebuild=True)  # from on_train_begin
    ...  # the first step runs
    learned = placement.finish(model)  # from on_train_batch_end
    ```
    """

    def __init__(self) -> None:
        self._fresh_function = True
        self._collecting = False
        self._learned: tuple[object, OpDevices] | None = None

    def note_model(self, model: keras.Model) -> None:
        """Notes whether `fit` is about to build a new train function."""
        # Keras calls set_model before make_train_function: a None here means
        # this fit() traces and instantiates a fresh function, whose placement
        # graph collection will see.
        self._fresh_function = getattr(model, "train_function", None) is None

    def start(self, model: keras.Model, *, rebuild: bool) -> OpDevices | None:
        """Returns the placement learned for this train function, or starts learning it.

        Args:
            model: The model `fit` trains; its train function already exists.
            rebuild: Whether to rebuild a train function that was instantiated
                before graph collection started (one extra trace). Not worth
                it when every op runs on one device anyway.

        Returns:
            The known placement, or `None` when `finish` will tell.
        """
        function = model.train_function
        if self._learned is not None and self._learned[0] is function:
            return self._learned[1]
        _compat.start_graph_collection()
        self._collecting = True
        if not self._fresh_function and rebuild:
            # This function was instantiated before the callback saw it: its
            # placement was not recorded.
            model.make_train_function(force=True)
        return None

    def finish(self, model: keras.Model) -> OpDevices | None:
        """Stops collecting and returns what the first step placed.

        Returns:
            The placement, or `None` when nothing was being collected.
        """
        if not self._collecting:
            return None
        self._collecting = False
        placement = OpDevices.from_run_metadata(_compat.stop_graph_collection())
        self._learned = (model.train_function, placement)
        return placement

    def cancel(self) -> None:
        """Stops collecting, if still collecting, and drops what was recorded."""
        if self._collecting:
            self._collecting = False
            _compat.stop_graph_collection()


def strategy_devices(strategy: tf.distribute.Strategy) -> list[str]:
    """Lists the devices a strategy computes on, in order.

    Args:
        strategy: A model's `distribute_strategy` (the default one included).

    Returns:
        Canonical device names: the strategy's local devices, then those its
        `communication_stats()` names (a tfpar strategy), if any.

    Example:

    ```python
    strategy_devices(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    # ['/device:CPU:0', '/device:CPU:1']
    ```
    """
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        # The coordinator computes nothing: the workers do, in other processes
        # (their counters name them below), and the parameter servers apply
        # the updates.
        devices = _parameter_servers()
    else:
        devices = _local_devices(strategy)
    # A tfpar strategy also names its devices in its counters (for a pipeline:
    # one per stage, while its host side is a one-device strategy).
    stats = getattr(strategy, "communication_stats", None)
    if callable(stats):
        try:
            # Another worker's replica (known by its wait) is that worker's.
            counted = [d.device for d in stats().devices if d.in_process]
        except Exception:  # the counters are CommunicationTime's business
            counted = []
        devices += [d for d in counted if d not in devices]
    return devices


def _parameter_servers() -> list[str]:
    # The strategy connected this process to the cluster: its devices are
    # listed with the others'.
    return [
        canonical_device(d.name)
        for d in tf.config.list_logical_devices()
        if tf.DeviceSpec.from_string(d.name).job == "ps"
    ]


def _local_devices(strategy: tf.distribute.Strategy) -> list[str]:
    try:
        return [canonical_device(d) for d in strategy.extended.worker_devices]
    except RuntimeError:
        # The default (no) strategy: TensorFlow places ops on the first GPU,
        # else on the first CPU.
        return default_devices()[:1]
