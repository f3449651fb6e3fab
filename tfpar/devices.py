"""Devices: simulated logical CPUs, the default device list, device validation.

TensorFlow configures its devices once per process, the first time anything
asks for them. `simulate_devices` must therefore run before that moment; it
detects a late call and says what to do instead of failing somewhere deep in a
strategy constructor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf

from tfpar._validation import check_int, check_sequence

_LOCAL_JOBS = (None, "localhost")
_DEVICE_NAMES = (
    "device names like '/device:CPU:0', '/gpu:1' or "
    "'/job:worker/replica:0/task:1/device:CPU:0'"
)


def simulate_devices(n: int) -> list[str]:
    """Splits the host CPU into `n` logical devices in this process.

    With simulated devices every tfpar strategy and callback can be developed,
    tested and demonstrated on a machine without accelerators. The logical
    devices share one inter-op thread pool and one allocator, so they are right
    for correctness, placement, numerics and overhead, but they cannot show a
    parallel speedup: for that, run one pinned process per device with
    `tfpar.LocalCluster`.

    Call it first thing, before any TensorFlow op runs or any device is listed.
    It does not start TensorFlow's runtime itself, so a
    `tfpar.MultiWorkerMirroredStrategy` may still be created after it.

    Args:
        n: Number of logical CPU devices, a positive `int`.

    Returns:
        The names of the logical CPU devices, e.g. `["/device:CPU:0",
        "/device:CPU:1"]`.

    Raises:
        TypeError: If `n` is not an `int`.
        ValueError: If `n` is smaller than 1.
        RuntimeError: If TensorFlow already initialized its devices with a
            different number of logical CPUs. Calling it again with the same
            `n` is a no-op.

    Example:

    ```python
    import tfpar
    tfpar.simulate_devices(2)
    strategy = tfpar.MirroredStrategy()  # replicas on CPU:0 and CPU:1
    ```
    """
    check_int("n", n, minimum=1)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as err:
        current = len(tf.config.list_logical_devices("CPU"))
        if current == n:
            return _names(tf.config.list_logical_devices("CPU"))
        raise RuntimeError(
            f"simulate_devices({n}) was called after TensorFlow initialized its "
            f"devices with {current} logical CPU device(s); TensorFlow configures "
            "devices only once per process. Call tfpar.simulate_devices() at the "
            "top of your program, before any TensorFlow op runs, any device is "
            "listed or any model is built (or run the code in a fresh process)."
        ) from err
    # Named without listing them: listing would start TensorFlow's runtime,
    # after which collective ops (tfpar.MultiWorkerMirroredStrategy) can no
    # longer be configured.
    return [f"/device:CPU:{i}" for i in range(n)]


def default_devices() -> list[str]:
    """Lists the devices a tfpar strategy uses when given `devices=None`.

    Returns:
        The names of all local logical GPUs if there is at least one, else of
        all local logical CPUs (one unless `simulate_devices` split the host).

    Example:

    ```python
    tfpar.simulate_devices(2)
    tfpar.default_devices()  # ['/device:CPU:0', '/device:CPU:1']
    ```
    """
    gpus = [d for d in tf.config.list_logical_devices("GPU") if _is_local(d.name)]
    if gpus:
        return _names(gpus)
    cpus = [d for d in tf.config.list_logical_devices("CPU") if _is_local(d.name)]
    return _names(cpus)


def canonical_device(name: str) -> str:
    """Returns the canonical spelling of a device name.

    Local devices lose their job, replica and task (`"/gpu:0"` and
    `"/job:localhost/replica:0/task:0/device:GPU:0"` both become
    `"/device:GPU:0"`); remote devices keep them, with replica and task
    defaulting to 0.

    Args:
        name: A TensorFlow device string.

    Returns:
        The canonical device string.

    Raises:
        ValueError: If `name` does not parse as a device or names no device type.
    """
    try:
        spec = tf.DeviceSpec.from_string(name)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"Not a device name: {name!r} (expected {_DEVICE_NAMES})."
        ) from err
    if spec.device_type is None:
        raise ValueError(
            f"Device name {name!r} names no device type (expected {_DEVICE_NAMES})."
        )
    spec = spec.replace(
        device_type=spec.device_type.upper(), device_index=spec.device_index or 0
    )
    if spec.job in _LOCAL_JOBS:
        spec = spec.replace(job=None, replica=None, task=None)
    else:
        spec = spec.replace(replica=spec.replica or 0, task=spec.task or 0)
    return spec.to_string()


def resolve_devices(
    devices: Sequence[str] | None, *, argument: str = "devices"
) -> list[str]:
    """Validates a strategy's `devices` argument and returns canonical names.

    Unlike the stock strategies, a device TensorFlow does not know is an error,
    not a silent fallback to the CPU.

    Args:
        devices: A list or tuple of device names, or `None` for
            `default_devices()`.
        argument: The argument's name, used in error messages.

    Returns:
        Canonical device names, in the given order.

    Raises:
        TypeError: If `devices` is a string or not a list or tuple of strings.
        ValueError: If it is empty, holds a string that is not a device name,
            names a device twice, or names a device that does not exist in
            this process or a connected cluster.
    """
    if devices is None:
        return default_devices()
    if isinstance(devices, str):
        raise TypeError(
            f"`{argument}` must be a list or tuple of device names. "
            f"Received: {argument}={devices!r} (for one device, write [{devices!r}])."
        )
    check_sequence(argument, devices, str, "a list or tuple of device names")
    if not devices:
        raise ValueError(
            f"`{argument}` must name at least one device. Received: {argument}=[]. "
            f"Available: {available_devices()}."
        )
    names = []
    for d in devices:
        try:
            names.append(canonical_device(d))
        except ValueError as err:
            raise ValueError(
                f"`{argument}` must be a list of {_DEVICE_NAMES}. Received: "
                f"{argument}={list(devices)!r}, whose item {d!r} is not a device "
                "name."
            ) from err
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"`{argument}` names a device more than once. Received: "
            f"{argument}={list(devices)!r} (duplicates: {duplicates})."
        )
    known = set(available_devices())
    missing = [d for d, n in zip(devices, names, strict=True) if n not in known]
    if missing:
        raise ValueError(
            f"`{argument}` names device(s) that do not exist: {missing}. "
            f"Received: {argument}={list(devices)!r}. Available: {sorted(known)}."
        )
    return names


def available_devices() -> list[str]:
    """Lists the canonical names of every logical device TensorFlow knows.

    Returns:
        Local logical devices and, once this process is connected to a cluster
        (`tfpar.LocalCluster.connect`), the remote ones.
    """
    return [canonical_device(d.name) for d in tf.config.list_logical_devices()]


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """What tfpar sees on this machine (printed by `tfpar devices`).

    Attributes:
        physical: `(name, type)` of each physical device.
        logical: Canonical names of the logical devices.
        default: The devices a strategy uses when given `devices=None`.
    """

    physical: tuple[tuple[str, str], ...]
    logical: tuple[str, ...]
    default: tuple[str, ...]

    @classmethod
    def collect(cls) -> DeviceReport:
        """Reads the report off TensorFlow (initializes its devices)."""
        return cls(
            physical=tuple(
                (d.name, d.device_type) for d in tf.config.list_physical_devices()
            ),
            logical=tuple(available_devices()),
            default=tuple(default_devices()),
        )

    def format(self) -> str:
        """Returns the report as aligned text."""
        lines = ["Physical devices:"]
        lines += [f"  {name}  ({kind})" for name, kind in self.physical]
        lines.append("Logical devices:")
        lines += [f"  {name}" for name in self.logical]
        lines.append("Used by a strategy with devices=None:")
        lines += [f"  {name}" for name in self.default]
        return "\n".join(lines)


def _is_local(name: str) -> bool:
    return tf.DeviceSpec.from_string(name).job in _LOCAL_JOBS


def process_task(strategy: tf.distribute.Strategy) -> str | None:
    """Returns the cluster task this process is, when it runs a strategy's replicas.

    Under a multi-worker strategy every worker is its own client, and its
    devices are named after its task (`/job:worker/replica:0/task:1/...`)
    although they are this process's own.

    Args:
        strategy: A model's `distribute_strategy`.

    Returns:
        The task, e.g. `"/job:worker/replica:0/task:1"`, or `None` when the
        strategy's replicas are not named after this process's task (no
        cluster; a single client driving other processes' devices; the
        coordinator of a parameter-server strategy).

    Example:

    ```python
    # On worker 1 of a job launched with `tfpar launch --workers 2`:
    strategy = tfpar.MultiWorkerMirroredStrategy()
    process_task(strategy)  # '/job:worker/replica:0/task:1'
    process_task(tf.distribute.get_strategy())  # None
    ```
    """
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        return None
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None)
    if task_type is None or task_id is None:
        return None
    return f"/job:{task_type}/replica:0/task:{task_id}"


def _names(devices: Sequence[tf.config.LogicalDevice]) -> list[str]:
    return [canonical_device(d.name) for d in devices]
