"""The DeepSpeed training engine: ``Trainer`` (build, loop, evaluate, checkpoint) and
``run_training`` (one rank of a run, as launched by launch/train.py or launch/submit.py)."""
from anchorformer.engine.run import run_training
from anchorformer.engine.trainer import FitResult, Trainer, TrainingDiverged

__all__ = ["Trainer", "FitResult", "TrainingDiverged", "run_training"]
