"""Every private TensorFlow and Keras internal tfpar relies on, and why.

None of these has a public path in TensorFlow 2.21 / Keras 3. They live only
in this package, one module per area of tfpar, each module's docstring saying
which internals it uses and why; nothing else in tfpar touches a private
TensorFlow or Keras name. `tests/test_compat.py` fails loudly if an upgrade
removes or changes any of them.
"""

from tfpar._compat.callbacks import (
    gpu_bus_ids,
    start_graph_collection,
    stop_graph_collection,
)
from tfpar._compat.cluster import (
    check_before_function_registration,
    detach_from_cluster,
    free_coordinator_threads,
)
from tfpar._compat.mirrored import (
    called_from_keras_symbolic_build,
    mirrored,
    per_replica,
    reduce_without_merge_call_in_nested_graphs,
    refuse_reductions_in_nested_graphs,
    reserve_collective_keys,
    stock_default_cross_device_ops,
    use_remote_devices,
)
from tfpar._compat.parameter_server import (
    KERAS_ENTRY_POINTS,
    current_worker_index,
    find_keras_caller,
    make_updates_atomic,
    schedule_callable,
    scheduled_tracing,
)
from tfpar._compat.pipeline import (
    OneDeviceExtended,
    UpdateContext,
    backing_variable,
    keras_step,
    loss_tracker,
    move_variable,
    seed_states,
)
from tfpar._compat.sharding import (
    is_sharded,
    merge_shard_gradients,
    support_sharded_variables,
)

__all__ = [
    "KERAS_ENTRY_POINTS",
    "OneDeviceExtended",
    "UpdateContext",
    "backing_variable",
    "called_from_keras_symbolic_build",
    "check_before_function_registration",
    "current_worker_index",
    "detach_from_cluster",
    "find_keras_caller",
    "free_coordinator_threads",
    "gpu_bus_ids",
    "is_sharded",
    "keras_step",
    "loss_tracker",
    "make_updates_atomic",
    "merge_shard_gradients",
    "mirrored",
    "move_variable",
    "per_replica",
    "reduce_without_merge_call_in_nested_graphs",
    "refuse_reductions_in_nested_graphs",
    "reserve_collective_keys",
    "schedule_callable",
    "scheduled_tracing",
    "seed_states",
    "start_graph_collection",
    "stock_default_cross_device_ops",
    "stop_graph_collection",
    "support_sharded_variables",
    "use_remote_devices",
]
