"""tfpar's public exceptions.

Each is raised in place of a hang or of an error from deep inside TensorFlow,
and carries the cluster task it is about, so a caller can tell which process
to restart.
"""

from __future__ import annotations

from collections.abc import Sequence


class StepDeadlineExceededError(TimeoutError):
    """A scheduled step ran longer than the step deadline on a worker.

    Attributes:
        tasks: The frozen workers, as `"/job:worker/replica:0/task:i"` names.
    """

    def __init__(self, message: str, tasks: Sequence[str]) -> None:
        super().__init__(message)
        self.tasks = tuple(tasks)


class ClusterTaskError(RuntimeError):
    """A cluster task failed (for example a killed parameter server).

    Attributes:
        task: The failed task, e.g. `"/job:ps/replica:0/task:0"`, or `None`
            when TensorFlow's error does not name one.
    """

    def __init__(self, message: str, task: str | None) -> None:
        super().__init__(message)
        self.task = task
