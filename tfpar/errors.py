"""tfpar's public exceptions.

Each is raised in place of a hang or of an error from deep inside TensorFlow,
and carries the cluster task it is about, so a caller can tell which process
to restart.
"""

from __future__ import annotations

from collections.abc import Sequence


class StepDeadlineExceededError(TimeoutError):
    """A scheduled step ran longer than the step deadline on a worker.

    Raised by `tfpar.ParameterServerStrategy(step_deadline=...)` in place of
    TensorFlow's endless wait on a frozen worker.

    Args:
        message: What happened, which workers, and what to do.
        tasks: The frozen workers' task names.

    Attributes:
        tasks: The frozen workers, as `"/job:worker/replica:0/task:i"` names.

    Example:

    ```python
    try:
        model.fit(dataset, epochs=3, steps_per_epoch=100)
    except tfpar.StepDeadlineExceededError as error:
        print("restart", error.tasks)
    ```
    """

    def __init__(self, message: str, tasks: Sequence[str]) -> None:
        super().__init__(message)
        self.tasks = tuple(tasks)


class ClusterTaskError(RuntimeError):
    """A cluster task failed (for example a killed parameter server).

    Raised by `tfpar.ParameterServerStrategy` when a task fails and by
    `tfpar.MultiWorkerMirroredStrategy` when a worker is lost; TensorFlow's
    own error is its `__cause__`.

    Args:
        message: What happened, which task and where, and what to do.
        task: The failed task's name, or `None`.

    Attributes:
        task: The failed task, e.g. `"/job:ps/replica:0/task:0"`, or `None`
            when TensorFlow's error does not name one.

    Example:

    ```python
    try:
        model.fit(x, y, epochs=3, callbacks=[keras.callbacks.BackupAndRestore(d)])
    except tfpar.ClusterTaskError as error:
        print("lost", error.task)  # relaunch: BackupAndRestore resumes
    ```
    """

    def __init__(self, message: str, task: str | None) -> None:
        super().__init__(message)
        self.task = task
