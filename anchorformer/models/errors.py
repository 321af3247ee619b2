"""The error a model constructor raises for an argument it refuses, carrying the argument's name so
that a caller can name its own key for it (the pre-flight names the config key)."""
__all__ = ["ModelArgumentError", "require"]


class ModelArgumentError(ValueError):
    """A constructor argument the model cannot be built with; ``argument`` is its name (``num_anchors``)."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(message)


def require(condition: bool, argument: str, message: str) -> None:
    """Raise :class:`ModelArgumentError` for ``argument`` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ModelArgumentError(argument, message)
