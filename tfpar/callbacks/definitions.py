"""What each tfpar summary is: the description TensorBoard shows beside it.

One definition per tag and, where strategies measure differently, per
strategy kind (`tfpar.CommunicationStats.kind`) or per source of a device's
utilization (`"profiler"`, `"remote_profiler"`, `"nvml"`, `"in_graph"`,
`"in_graph_async"`). Each says whether the number is
measured, counted, computed from other numbers, or modelled. docs/callbacks.md
holds the same definitions as tables.
"""

from __future__ import annotations

import re

# (tag pattern, context or None for any, definition), first match wins.
_DEFINITIONS: tuple[tuple[str, str | None, str], ...] = (
    (
        r"comm/step_time_ms",
        None,
        "Measured: wall time of a training step in this process, from batch "
        "start to batch end, averaged over the steps since the previous sample.",
    ),
    (
        r"comm/time_ms",
        "allreduce",
        "Measured: exposed gradient all-reduce time per step, from the last "
        "replica having all its gradients to every replica having the reduced "
        "ones (host timestamp ops in the step's graph).",
    ),
    (
        r"comm/time_ms",
        "pipeline",
        "Measured: exposed communication per step, the time an average stage "
        "sat free waiting for a tensor its neighbour had already produced.",
    ),
    (
        r"comm/compute_ms",
        None,
        "Computed: step_time_ms - time_ms, everything but exposed "
        "communication (compute, input, optimizer update). Never clamped.",
    ),
    (
        r"comm/fraction",
        None,
        "Computed: time_ms / step_time_ms. Never clamped.",
    ),
    (
        r"comm/dispatch_ms",
        None,
        "Measured: per step, the wall time of training functions on the "
        "coordinator, from scheduling to results back, beyond their time on "
        "the worker. Communication with the parameter servers happens inside "
        "the workers' steps and is not measured.",
    ),
    (
        r"comm/bytes_per_step",
        "allreduce",
        "Counted: one replica's gradient bytes handed to the all-reduce per "
        "step, after any compression.",
    ),
    (
        r"comm/bytes_per_step",
        "pipeline",
        "Counted: bytes crossing every stage boundary per step, activations "
        "forward and gradients back, from the tensors sent.",
    ),
    (
        r"comm/bandwidth_mib_per_s",
        None,
        "Computed: bytes_per_step / time_ms, in MiB/s.",
    ),
    (
        r"comm/device/.+/busy_ms",
        "pipeline",
        "Measured: per step, the time this stage spent computing its actions.",
    ),
    (
        r"comm/device/.+/busy_ms",
        "allreduce",
        "Measured: per step, from this replica's step inputs existing to its "
        "gradients existing: the forward and backward pass.",
    ),
    (
        r"comm/device/.+/busy_ms",
        "parameter_server",
        "Measured: per step, the time this worker's training functions ran, "
        "first to last op, including the reads and updates of variables on "
        "the parameter servers they wait for.",
    ),
    (
        r"comm/device/.+/comm_ms",
        "allreduce",
        "Measured: per step, from this replica's gradients being ready to its "
        "reduced gradients being ready; includes waiting for slower replicas.",
    ),
    (
        r"comm/device/.+/comm_ms",
        "pipeline",
        "Measured: per step, the time this stage sat free waiting for a tensor "
        "its neighbour had already produced (exposed communication).",
    ),
    (
        r"comm/device/.+/busy_ms",
        None,
        "Measured by the strategy: per step, the time this device computed.",
    ),
    (
        r"comm/device/.+/comm_ms",
        None,
        "Measured by the strategy: per step, the time this device communicated.",
    ),
    (
        r"comm/device/.+/idle_ms",
        None,
        "Measured by the strategy: per step, the time this device waited.",
    ),
    (
        r"comm/device/.+/bubble_ms",
        None,
        "Measured: per step, the stage's bubble: the step's span minus its "
        "busy and exposed communication time (waiting for a neighbour still "
        "computing, or for the schedule).",
    ),
    (
        r"comm/device/.+/bytes_sent_per_step",
        None,
        "Counted: bytes this stage sent per step, activations forward and "
        "gradients back, from the tensors sent.",
    ),
    (
        r"comm/device/.+/modelled_bytes_sent_per_step",
        None,
        "Modelled, not observed: bytes this replica sends per step by the "
        "all-reduce algorithm's routing (a ring: 2(n-1)/n of the buffer).",
    ),
    (
        r"comm/device/.+/reduce_ms",
        None,
        "Measured: per step, the exposed time of the gradient reduction among "
        "a stage's replicas: on replica 0, from the last replica's gradients "
        "ready to their total on replica 0; on another replica, its copy of "
        "the stage's weights arriving after its first input.",
    ),
    (
        r"comm/device/.+/reduce_bytes_per_step",
        None,
        "Counted: bytes this stage replica sent per step for the gradient "
        "reduction among the stage's replicas: its summed weight gradients "
        "(replicas r > 0), or the weight copies (replica 0).",
    ),
    (
        r"comm/device/.+/dispatch_ms",
        None,
        "Measured: per step, this worker's training functions' wall time on "
        "the coordinator beyond their time on the worker.",
    ),
    (
        r"comm/device/.+/wait_ms",
        "pipeline",
        "Measured: per step, how long this stage replica waited at its "
        "stage's gradient reduction for the last replica: from the end of its "
        "own last action to the end of the last one among the stage's "
        "replicas (a part of its bubble).",
    ),
    (
        r"comm/device/.+/slowest_fraction",
        "pipeline",
        "Counted: the share of steps at which the others waited for this "
        "device: it was the last of its stage's replicas, and of the stages' "
        "last replicas its busy time most exceeded its stage's others'.",
    ),
    (
        r"comm/device/.+/wait_ms",
        None,
        "Measured: per step, how long this replica waited at the gradient "
        "synchronization for the slowest replica: the longest interval from "
        "release by the previous synchronization to arrival at this one, "
        "minus this replica's own.",
    ),
    (
        r"comm/device/.+/slowest_fraction",
        None,
        "Counted: the share of gradient synchronizations at which this "
        "replica was the slowest, the one the others waited for.",
    ),
    (
        r"device/.+/utilization",
        "profiler",
        "Measured (TensorFlow profiler): the share of a traced window of steps "
        "during which an op placed on this device ran (union of op intervals; "
        "receives, collectives and tf.data ops left out).",
    ),
    (
        r"device/.+/utilization",
        "remote_profiler",
        "Measured (TensorFlow profiler, in the task's own process, through its "
        "profiler service): the share of a traced window of remote_window_ms "
        "during which an op of this task ran (union of op intervals; "
        "receives, sends, collectives and tf.data ops left out).",
    ),
    (
        r"device/.+/utilization",
        "in_graph_async",
        "Measured in the step's graph by the parameter-server strategy: the "
        "share of wall time between two samples during which this worker ran "
        "training functions, first to last op (timestamps on the worker), "
        "including the reads and updates on the parameter servers they wait "
        "for.",
    ),
    (
        r"device/.+/utilization",
        "in_graph",
        "Measured in the step's graph by the strategy (no profiler sees this "
        "device's ops from here): the share of the training steps' wall time, "
        "batch start to batch end in this process, during which the device was "
        "busy, from timestamps on its host: a pipeline stage inside its "
        "actions, a data-parallel replica from its step's inputs to its "
        "gradients (the forward and backward pass).",
    ),
    (
        r"device/.+/utilization",
        "nvml",
        "Measured (NVML): the share of time a kernel was running on the GPU, "
        "whatever process ran it.",
    ),
    (
        r"device/.+/(peak_)?memory_mib",
        None,
        "Measured (TensorFlow's allocator): memory in use on the device, or "
        "its peak, in MiB.",
    ),
    (
        r"device/.+/nvml_memory_mib",
        None,
        "Measured (NVML): GPU memory used by all processes, in MiB.",
    ),
    (
        r"host/cpu_utilization",
        None,
        "Measured (psutil): this process's CPU time over wall time, divided by "
        "the cores it may use, averaged since the previous sample.",
    ),
    (
        r"host/rss_mib",
        None,
        "Measured (psutil): resident memory of this process, in MiB.",
    ),
    (
        r"host/peak_rss_mib",
        None,
        "Measured (getrusage): the process's resident-memory high-water mark, in MiB.",
    ),
)


def describe(tag: str, context: str | None = None) -> str:
    """Returns the definition of a tfpar summary tag, or `""` if it has none.

    Args:
        tag: The summary's tag, e.g. `"comm/time_ms"`.
        context: What tells apart the strategies or sources that measure
            the tag differently: a `CommunicationStats.kind` for `comm/`
            tags, `"profiler"`, `"nvml"` or `"in_graph"` for a device's
            utilization.

    Returns:
        The definition, which says whether the number is measured, counted,
        computed or modelled.

    Example:

    ```python
    describe("comm/time_ms", "pipeline")  # 'Measured: exposed communication ...'
    ```
    """
    for pattern, where, text in _DEFINITIONS:
        if (where is None or where == context) and re.fullmatch(pattern, tag):
            return text
    return ""
