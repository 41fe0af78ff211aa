"""The one exception hierarchy of dfm-stream.

Every error the library raises on purpose is a :class:`DfmStreamError`, so a caller (the CLI, a
worker loop) can tell "bad input, explained" from "a bug". Messages say what was wrong, with which
file, camera or key, and what to do about it.
"""


class DfmStreamError(Exception):
    """Base class of every error dfm-stream raises on purpose."""


class ConfigError(DfmStreamError):
    """A config file, environment variable or command-line option is invalid."""


class WireError(DfmStreamError):
    """A message read from Redis cannot be decoded (bad msgpack, missing field, wrong type)."""

    def __init__(self, message: str, reason: str = "bad_message") -> None:
        super().__init__(message)
        self.reason = reason


class UnsupportedVersionError(WireError):
    """A message carries a schema major version this build does not understand."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="unsupported_version")


class RedisConnectError(DfmStreamError):
    """A Redis URL is malformed or the server refused the credentials or TLS settings."""


class NotReplicatedError(DfmStreamError):
    """``--durability replicated``: no replica confirmed a write (``WAIT 1``) within the timeout."""


class ImageReadError(DfmStreamError):
    """An image file is missing, unreadable or corrupt."""


class ScoreTypeError(DfmStreamError):
    """An operation is not available for the model's score type (e.g. anomaly maps with ``nll``)."""


class WeightsError(DfmStreamError):
    """Backbone weights cannot be obtained or do not fit the backbone."""


class ModelConfigError(DfmStreamError):
    """Unknown backbone or layer, or a model setting out of range."""


class NotFittedError(DfmStreamError):
    """A model is used for scoring before it was fitted."""


class ArtifactError(DfmStreamError):
    """A model artifact is truncated, tampered with, or of an incompatible version."""


class SourceError(DfmStreamError):
    """A camera source cannot be opened or its specification is invalid."""


class RegistryError(DfmStreamError):
    """A model registry operation failed (unknown model or version, bad artifact)."""


class BackendError(DfmStreamError):
    """A backbone execution backend (onnxruntime, openvino, compile) is not installed or cannot run."""


class InspectionError(DfmStreamError):
    """A part inspection job could not run (``reason``: bad_request, unknown_camera, busy, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BridgeError(DfmStreamError):
    """The bridge cannot start an adapter (bad URL or endpoint, unreadable password file, port in use)."""


class PortInUseError(DfmStreamError):
    """A port to listen on (``--metrics-port``) is taken by another process or cannot be bound."""


class RedisUnavailableError(RedisConnectError):
    """Redis cannot be reached, refused the credentials, or refused a command for lack of rights."""


class ConsoleError(DfmStreamError):
    """The operator console cannot start or act: a bad users file, an unknown user, a bad role."""


class NoFramesError(DfmStreamError):
    """A reader ran to its end and a camera sent nothing to Redis (no frame from the source, none written)."""
