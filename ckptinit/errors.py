"""One exception hierarchy; the CLI turns each into a one-line message and an exit code."""

from __future__ import annotations


class CkptInitError(Exception):
    """Base class. The message is one line: what failed and what to do next."""

    exit_code = 1


class UsageError(CkptInitError):
    """Bad option values or combinations."""

    exit_code = 2


class SourceError(CkptInitError):
    """The model source (architecture name, checkpoint, hub repo) cannot be used."""


class UnsafePickleError(SourceError):
    """A pickle needs more than tensors and plain containers; only --trust-pickle loads it."""


class DataError(CkptInitError):
    """The calibration data cannot be found, read or streamed."""


class OutputError(CkptInitError):
    """The output cannot be written (exists, unwritable)."""


class DeviceError(CkptInitError):
    """The requested device does not exist on this machine (e.g. --device cuda, no GPU)."""


class FunctionChangedError(CkptInitError):
    """The between-layer step changed the network's outputs beyond the announced tolerance."""


class PublishError(CkptInitError):
    """The Hugging Face Hub refused or could not take an upload (login, access, network)."""
