"""What can be trained: a registry of tasks behind one protocol (see ``base.Task``)."""
from anchorformer.tasks.base import TASKS, Runtime, Task, TrainStreamLike, build_task, task_class

__all__ = ["TASKS", "Runtime", "Task", "TrainStreamLike", "build_task", "task_class"]
