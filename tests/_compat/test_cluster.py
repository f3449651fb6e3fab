"""Internals of clusters (`tfpar/_compat/cluster.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/cluster.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import inspect

import tensorflow as tf
from tensorflow.python.distribute.coordinator import cluster_coordinator

from tfpar._compat import cluster as _compat


def test_eager_context_can_leave_a_cluster():
    # detach_from_cluster: a process that never connected has no server def,
    # and the method that drops remote jobs exists.
    from tensorflow.python.eager import context

    assert callable(context.Context.update_server_def)
    assert context.context().get_server_def() is None
    assert _compat.detach_from_cluster(["127.0.0.1:1"]) is False


def test_coordinator_worker_threads_can_run_on_their_own_executor():
    # free_coordinator_threads: each closure runs in
    # `context.executor_scope(worker.executor)`, whose view of the thread's
    # previous executor waits on it; the worker thread looks up its closure
    # methods at every closure, so a swapped Worker's overrides apply; the
    # `Context.executor` setter switches the calling thread only, creating
    # no view (no wait).
    import threading

    from tensorflow.python.eager import context
    from tensorflow.python.eager import executor as executor_module

    assert "context.executor_scope(worker.executor)" in inspect.getsource(
        cluster_coordinator.Closure.execute_on
    )
    assert "executor_old = ctx.executor" in inspect.getsource(context.executor_scope)
    assert "self.wait()" in inspect.getsource(executor_module.Executor.__del__)
    assert "self.executor = executor.new_executor(" in inspect.getsource(
        cluster_coordinator.Worker.__init__
    )
    queue_loop = inspect.getsource(cluster_coordinator.Worker._process_queue)
    assert "self._process_closure(closure)" in queue_loop
    assert "self._process_resource_closure(closure)" in queue_loop
    assert "closure.execute_on(self)" in inspect.getsource(
        cluster_coordinator.Worker._process_closure
    )
    assert "closure.execute_on(self)" in inspect.getsource(
        cluster_coordinator.Worker._process_resource_closure
    )
    assert "TFE_ContextSetExecutorForThread" in inspect.getsource(
        context.Context.executor.fset
    )
    assert _compat.TfparCoordinatorWorker.__bases__ == (cluster_coordinator.Worker,)
    assert _compat.TfparCoordinatorWorker.__module__ == "tfpar._compat.cluster"

    # An async executor makes the switch observable: after it, the thread's
    # closures (in the stock scope) and the ops between them run on the
    # worker's executor, and the stock scope leaves the thread on it.
    class Worker:
        executor = executor_module.new_executor(enable_async=True)

    worker = Worker()

    def run(out: list[object]) -> None:
        out.append(context.context().executor.is_async())
        _compat.TfparCoordinatorWorker._use_own_executor(worker)  # type: ignore[arg-type]
        with context.executor_scope(worker.executor):
            out.append(float(tf.reduce_sum(tf.ones([3]))))
        out.append(context.context().executor.is_async())
        out.append(float(tf.reduce_sum(tf.ones([2]))))

    out: list[object] = []
    thread = threading.Thread(target=run, args=(out,))
    thread.start()
    thread.join(30)
    assert out == [False, 3.0, True, 2.0]
    assert not context.context().executor.is_async()  # other threads unchanged


def test_tfpar_replaces_no_tensorflow_function():
    # Wrap, never patch: the functions tfpar once replaced are TensorFlow's.
    from tensorflow.python.eager import context

    assert context.executor_scope.__module__ == "tensorflow.python.eager.context"
    for name in ("add_c_function", "add_function_def"):
        method = getattr(context.Context, name)
        assert method.__module__ == "tensorflow.python.eager.context", name
        assert method.__qualname__ == f"Context.{name}", name


def test_a_tf_function_body_runs_at_tracing_before_its_registration():
    # The step functions of tfpar check that every worker answers first
    # thing in their Python body: it runs only while tracing, before
    # TensorFlow registers the new function (with every remote task, when
    # connected) in `Context.add_c_function`/`add_function_def`.
    from tensorflow.python.eager import context

    assert "TFE_ContextAddFunction(" in inspect.getsource(
        context.Context.add_c_function
    )
    names_at_body: list[set[str]] = []

    def body(x: tf.Tensor) -> tf.Tensor:
        names_at_body.append(set(context.context().list_function_names()))
        return x + 1

    function = tf.function(body)
    function(tf.constant(1.0))
    function(tf.constant(2.0))  # no new trace: the body does not run
    assert len(names_at_body) == 1
    concrete = function.get_concrete_function(tf.TensorSpec([], tf.float32))
    name = concrete.function_def.signature.name
    assert context.context().has_function(name)
    assert name not in names_at_body[0]
