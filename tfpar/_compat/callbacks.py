"""Private TensorFlow internals of the callbacks, and why.

Used by `tfpar/callbacks/placement.py`, `profiling.py` and `sources.py`. Each
has no public path in the supported TensorFlow:

- Graph collection (`context.enable_graph_collection`,
  `export_run_metadata`): on CPU the profiler records the thread, not the
  logical device (`/device:CPU:1` shares `/device:CPU:0`'s thread pool). Each
  op's device is in the partition graphs TensorFlow builds when it
  instantiates a function, exported through the eager context's run
  metadata. `tf.summary.trace_on(graph=True)` switches the same collection
  on but only writes it to an event file: no public path returns the graphs
  to Python. Without them `DeviceUtilization` falls back to attributing ops by
  name.
- `xplane_pb2.XSpace` (`tensorflow.tsl`): `tf.profiler` writes its trace only
  as a serialized `XSpace` and exports no reader for it; the profile plugin
  ships a copy of the proto, but it is an optional extra.
- `device_lib.list_local_devices()`: NVML numbers GPUs differently from
  TensorFlow (`CUDA_VISIBLE_DEVICES` renumbers TensorFlow's), so they are
  matched by PCI bus id, which TensorFlow reports only in these device
  descriptions.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.eager import context


def start_graph_collection() -> None:
    """Starts recording the partition graphs of functions instantiated from now on."""
    context.context().enable_graph_collection()


def stop_graph_collection() -> tf.compat.v1.RunMetadata:
    """Stops recording and returns what was recorded.

    Returns:
        A `RunMetadata` proto whose `function_graphs[i].partition_graphs` hold
        the placed (post-optimization) graphs, one per device.
    """
    ctx = context.context()
    metadata = ctx.export_run_metadata()
    ctx.disable_graph_collection()
    return metadata if metadata is not None else tf.compat.v1.RunMetadata()


def xspace(serialized: bytes = b"") -> Any:
    """Returns an `XSpace` proto (a profiler trace), parsed from `serialized`.

    Args:
        serialized: The bytes of a `.xplane.pb` file; empty for a new trace.
    """
    # Imported on first use: `import tensorflow` does not load it.
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(serialized)
    return space


def gpu_bus_ids() -> dict[str, str]:
    """Maps local TensorFlow GPU names to their PCI bus ids.

    Returns:
        Canonical device name to bus id (e.g. `"0000:00:04.0"`); empty on a
        machine without GPUs.
    """
    from tensorflow.python.client import device_lib

    result = {}
    for device in device_lib.list_local_devices():
        if device.device_type != "GPU":
            continue
        for part in device.physical_device_desc.split(","):
            key, _, value = part.partition(":")
            if key.strip() == "pci bus id":
                result[_local_name(device.name)] = value.strip()
    return result


def _local_name(name: str) -> str:
    spec = tf.DeviceSpec.from_string(name)
    return f"/device:{(spec.device_type or 'CPU').upper()}:{spec.device_index or 0}"
