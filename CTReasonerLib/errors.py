"""User-facing errors. The CLI, server and Slicer module show these as one clear message, never a traceback."""
from __future__ import annotations


class CTReasonerError(Exception):
    """An error a user can act on: ``message`` names the problem, ``hint`` says what to do."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputFileError(CTReasonerError):
    """A file that is missing, unreadable, or not what the command expects."""


class ConfigError(CTReasonerError):
    """A configuration or argument that cannot work."""


class ModelError(CTReasonerError):
    """A model that cannot be loaded or that failed while running."""
