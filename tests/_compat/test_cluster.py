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


def test_coordinator_threads_can_restore_the_default_executor_without_waiting():
    # free_coordinator_threads: each closure runs in
    # `context.executor_scope(worker.executor)`, looked up on the module at
    # every call; the stock scope's view of the previous executor waits on
    # deletion, the replacement restores it through the same view.
    import threading
    import types

    from tensorflow.python.eager import context
    from tensorflow.python.eager import executor as executor_module

    assert "context.executor_scope(worker.executor)" in inspect.getsource(
        cluster_coordinator.Closure.execute_on
    )
    assert "self.wait()" in inspect.getsource(executor_module.Executor.__del__)
    assert "self.executor = executor.new_executor(" in inspect.getsource(
        cluster_coordinator.Worker.__init__
    )

    class Worker:  # the coordinator's `Worker` objects are weakly referenced
        executor = executor_module.new_executor(enable_async=False)

    worker = Worker()
    other = executor_module.new_executor(enable_async=False)
    coordinator = types.SimpleNamespace(
        _cluster=types.SimpleNamespace(workers=[worker])
    )
    _compat.free_coordinator_threads(coordinator)
    assert context.executor_scope.__module__ == "tfpar._compat.cluster"

    def run(e: executor_module.Executor, out: list[object]) -> None:
        with context.executor_scope(e):
            out.append(float(tf.reduce_sum(tf.ones([3]))))
        out.append(float(tf.reduce_sum(tf.ones([2]))))  # the default executor
        out.append(context.context().executor.is_async())

    for e in (worker.executor, other):  # tfpar's worker, then the stock path
        out: list[object] = []
        thread = threading.Thread(target=run, args=(e, out))
        thread.start()
        thread.join(30)
        assert out == [3.0, 2.0, False]


def test_function_registration_runs_the_checks_first():
    # check_before_function_registration: the eager context's two methods
    # that register a function (with every remote task, when connected).
    from tensorflow.python.eager import context

    assert "TFE_ContextAddFunction(" in inspect.getsource(
        context.Context.add_c_function
    )
    assert "TFE_ContextAddFunctionDef" in inspect.getsource(
        context.Context.add_function_def
    )

    class Owner:
        calls = 0

        def check(self) -> None:
            self.calls += 1

    owner = Owner()
    _compat.check_before_function_registration(owner.check)
    tf.function(lambda x: x + 1)(tf.constant(1.0))
    assert owner.calls >= 1
    del owner  # held weakly: its check is dropped with it
    tf.function(lambda x: x + 2)(tf.constant(1.0))
