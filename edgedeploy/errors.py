"""One exception hierarchy for the whole tool.

    EdgeDeployError
    ├── UserInputError            the user's input is wrong; exit code 2, never a traceback
    │   ├── ModelLoadError        the .onnx file can't be read safely (empty, garbage, too big, ...)
    │   ├── UnsafeModelError      external data that points outside the model's folder
    │   ├── DataError             calibration / eval data of the wrong shape, dtype or format
    │   ├── ProfileError          a device profile that doesn't validate
    │   └── OptionError           a command-line value that can't be used
    ├── CheckRefused              a hardware/compiler check refused the request (exit code 4)
    ├── StageError                a stage failed on valid input (exit code 1)
    │   ├── StaticShapeError      the static rewrite of a model changed its outputs
    │   ├── QuantizationError
    │   ├── CompileError
    │   └── BenchmarkError        the device-side runner failed or returned nonsense
    └── TransportError            moving files to / running commands on a device
        ├── TransportTimeout      a connection phase (connect, banner, ...) timed out; transient: retried
        ├── ConnectFailed         the device refused or dropped the connection; transient: retried
        ├── HostKeyError          unknown or changed host key; permanent: never retried
        ├── AuthError             the device refused our key; permanent: never retried
        ├── PreflightError        the device isn't what the profile says (arch, Python, runtime, disk)
        ├── CommandTimeout        a command on the device ran past its limit and was killed
        └── ChecksumMismatch      permanent: never retried

Every error carries what happened, the offending value, what was expected and how to fix it;
``transient`` tells the retry policy whether another attempt can help.
"""

from __future__ import annotations

from typing import Any, ClassVar


class EdgeDeployError(Exception):
    """Base class: a message a user can act on, plus structured context."""

    transient: ClassVar[bool] = False
    exit_code: ClassVar[int] = 1

    def __init__(
        self,
        what: str,
        *,
        value: Any = None,
        expected: str | None = None,
        fix: str | None = None,
        **context: Any,
    ) -> None:
        self.what = what
        self.value = value
        self.expected = expected
        self.fix = fix
        self.context = context
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        if self.value is not None:
            lines.append(f"  given: {self.value}")
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        for key, val in self.context.items():
            lines.append(f"  {key}: {val}")
        if self.fix:
            lines.append(f"  how to fix: {self.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, for --json output and stored results."""
        return {
            "error": type(self).__name__,
            "what": self.what,
            "value": None if self.value is None else str(self.value),
            "expected": self.expected,
            "fix": self.fix,
            **{k: str(v) for k, v in self.context.items()},
        }

    def __reduce__(self):  # keep context when pickled across processes (Prefect, multiprocessing)
        return (_rebuild, (type(self), self.what, self.value, self.expected, self.fix, self.context))


def _rebuild(cls, what, value, expected, fix, context):
    return cls(what, value=value, expected=expected, fix=fix, **context)


class UserInputError(EdgeDeployError):
    """The user's input can't be used as given; nothing was changed."""

    exit_code = 2


class ModelLoadError(UserInputError):
    """The model file can't be loaded safely."""


class UnsafeModelError(UserInputError):
    """The model refers to files outside its own folder (ONNX external-data path traversal)."""


class DataError(UserInputError):
    """Calibration or evaluation data doesn't match the model."""


class ProfileError(UserInputError):
    """A device profile file is invalid."""


class OptionError(UserInputError):
    """A command-line option value can't be used."""


class CheckRefused(EdgeDeployError):
    """The device or the compiler can't run what was asked; nothing was quantized or compiled."""

    exit_code = 4


class StageError(EdgeDeployError):
    """A pipeline stage failed on valid input."""


class BoardBusy(EdgeDeployError):
    """Another run holds the board's lock past the wait this profile allows."""


class ResultsBusy(StageError):
    """The results database is locked by another writer; transient: retried."""

    transient = True


class StaticShapeError(StageError):
    """Making the model's shapes static changed what it computes."""


class QuantizationError(StageError):
    """onnxruntime.quantization failed."""


class CompileError(StageError):
    """The compiler could not import or build the model."""


class BenchmarkError(StageError):
    """The device-side runner failed."""


class TransportError(EdgeDeployError):
    """Moving a file to, or running a command on, a device failed."""


class TransportTimeout(TransportError):
    """A phase (connect, command, ...) ran past its time limit; another attempt may succeed."""

    transient = True


class ConnectFailed(TransportError):
    """The device refused or dropped the connection (network trouble, sshd restarting)."""

    transient = True


class HostKeyError(TransportError):
    """The device's host key is unknown or has changed: refused, never retried."""


class AuthError(TransportError):
    """The device refused our credentials: never retried."""


class PreflightError(TransportError):
    """The device doesn't match its profile, or lacks what the run needs."""


class CommandTimeout(TransportError):
    """A command on the device ran past its time limit; it was killed with its process group."""


class ChecksumMismatch(TransportError):
    """The file on the device differs from the one sent; never retried."""
