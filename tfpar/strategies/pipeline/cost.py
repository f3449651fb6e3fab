"""What a pipeline segment costs: measured time, counted FLOPs, or parameters.

`partition="auto"` balances the stages by measured cost: each indivisible
segment of the model (the layers between two neighbouring cut points) runs
its forward and backward pass on a sample micro-batch, on the first stage's
device, and the median time per pass is its cost. `partition="flops"` counts
the forward FLOPs of a traced pass instead (no run, the same cut every time),
and `partition="params"` uses parameter counts.

A measurement must time the layers, not the call: the segments' passes run
one after the other inside one `tf.function`, each timed by `tf.timestamp()`
ops on the device (so neither the call to a remote worker nor the copy of
the inputs and weights to it, made before the clock starts, is counted), and
the median over a few calls is kept. The layers read those copies through
`keras.StatelessScope`, which also discards state updates (BatchNormalization
statistics and seed generators are left as they were).
"""

from __future__ import annotations

import statistics
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from tfpar._validation import check_int

# Names accepted by `partition`, besides a list of cut points.
COST_METHODS = ("auto", "flops", "params")


def count_flops(graph: tf.Graph) -> int:
    """Floating-point operations of one run of `graph` (static shapes).

    Args:
        graph: A traced function's graph.

    Returns:
        The total of TensorFlow's registered FLOP counts of its ops.
    """
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    stats = tf.compat.v1.profiler.profile(graph=graph, options=options)
    return int(stats.total_float_ops)


def measure_seconds(
    segments: list[keras.Model],
    specs: list[Any],
    device: str,
    *,
    repeats: int = 7,
) -> list[float]:
    """Times one forward and backward pass of each segment on `device`.

    All segments run one after the other in one `tf.function`, each between
    two `tf.timestamp()` ops on the device, so the time of calling the
    function (an RPC for a remote worker) is not counted. The first segment's
    backward pass skips the input gradient, as the pipeline's first stage does.

    Args:
        segments: Functional models (the layers of each segment).
        specs: `tf.TensorSpec` structure of each segment's input, batch
            dimension known.
        device: Where to run the passes.
        repeats: Timed calls after a warm-up call; the median per segment is
            returned. Defaults to `7`.

    Returns:
        Seconds per forward and backward pass, one value per segment.

    Raises:
        Any error of running a segment alone (the caller falls back to an
        estimate), and a `TypeError` or `ValueError` for a `repeats` that is
        not an int >= 1.
    """
    check_int("repeats", repeats, minimum=1)
    samples = [tree.map_structure(_sample, spec) for spec in specs]
    timed = _timed_passes(segments, device)
    timed(samples)  # traces and warms up
    runs = [timed(samples)[0].numpy() for _ in range(repeats)]
    return [
        float(statistics.median(run[i] for run in runs)) for i in range(len(segments))
    ]


def _timed_passes(segments: list[keras.Model], device: str) -> Any:
    @tf.function(autograph=False)
    def timed(samples: list[Any]) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.device(device):
            # Inputs and weights are copied to the device before the clock
            # starts: before partitioning the weights live on the host, and a
            # transfer to a remote worker would be timed with the layers.
            copies = [
                _copies(segment, x)
                for segment, x in zip(segments, samples, strict=True)
            ]
            # Plain timestamps: tf.function runs them in program order, the
            # order wanted here (one device, one segment after the other).
            with tf.control_dependencies(tree.flatten(copies)):
                stamps = [tf.timestamp()]
            checksums = []
            for i, (segment, (x, values)) in enumerate(
                zip(segments, copies, strict=True)
            ):
                with tf.control_dependencies([stamps[-1]]):
                    checksums.append(_passes(segment, x, values, input_gradient=i > 0))
                with tf.control_dependencies([checksums[-1]]):
                    stamps.append(tf.timestamp())
            return tf.stack(stamps[1:]) - tf.stack(stamps[:-1]), tf.add_n(checksums)

    return timed


def _copies(segment: keras.Model, x: Any) -> tuple[Any, list[tf.Tensor]]:
    return tree.map_structure(tf.identity, x), [
        tf.identity(v.value) for v in segment.variables
    ]


def _passes(
    segment: keras.Model, x: Any, values: list[tf.Tensor], *, input_gradient: bool
) -> tf.Tensor:
    """One forward and backward pass; returns a scalar computed from all of it.

    The scalar is returned by the timed function: grappler turns ops whose
    results feed only control edges into no-ops, so a pass that is merely
    waited for would not run at all.
    """
    # The layers read `values` (copies of their weights) through
    # StatelessScope, which also discards the forward's state updates.
    variables = list(segment.variables)
    trainable = {id(v) for v in segment.trainable_variables}
    # An identity under the caller's control dependency, so the pass starts
    # after the clock.
    x = tree.map_structure(tf.identity, x)
    values = [tf.identity(value) for value in values]
    watched = [t for t in tree.flatten(x) if t.dtype.is_floating and input_gradient]
    watched += [
        value for v, value in zip(variables, values, strict=True) if id(v) in trainable
    ]
    mapping = list(zip(variables, values, strict=True))
    with keras.StatelessScope(state_mapping=mapping), tf.GradientTape() as tape:
        tape.watch(watched)
        out = segment(x, training=True)
        loss = tf.add_n(
            [tf.reduce_sum(tf.cast(t, tf.float32)) for t in tree.flatten(out)]
        )
    grads = [g for g in tape.gradient(loss, watched) if g is not None]
    dense = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
    return tf.add_n([loss, *[tf.reduce_sum(tf.cast(g, tf.float32)) for g in dense]])


def _sample(spec: tf.TensorSpec) -> tf.Tensor:
    # Zeros are valid for integer inputs (embedding indices); floats get
    # values that exercise the layers like data would.
    if spec.dtype.is_floating:
        return tf.random.stateless_normal(spec.shape, seed=[0, 0], dtype=spec.dtype)
    return tf.zeros(spec.shape, spec.dtype)
