"""Exceptions this package raises where SAELens would fail late or obscurely."""

from pathlib import Path


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; raised before the optimizer step."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step
        """The trainer's step counter (`TrainStepInput.n_training_steps`)."""


class SAELoadError(ValueError):
    """A saved SAE cannot be loaded; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        """The file (or folder) at fault."""
