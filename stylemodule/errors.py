"""Exceptions raised by stylemodule.

The command line turns an ``InputError`` into a one-line message and exit code 2
(bad input, rejected before any work starts) and any other ``StyleModuleError``
into exit code 1 (a run that started and failed).
"""

import reprlib

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


class StyleModuleError(Exception):
    """Base class of every error that stylemodule raises on purpose."""


class InputError(StyleModuleError, ValueError):
    """An invalid setting, file or argument, found before any work starts."""


class ConfigError(InputError):
    """An invalid configuration value, key or preset name."""


class ImageError(InputError):
    """An image file that is missing, unreadable or of an unusable size."""


class DataError(InputError):
    """A reference data file that is missing or does not match the manifest."""


class DownloadError(StyleModuleError):
    """A download that failed or did not match the manifest, or a downloaded file that could not be saved."""


class CheckpointError(InputError):
    """A checkpoint that does not belong to the run it should resume."""


class NonFiniteLossError(StyleModuleError, FloatingPointError):
    """The loss became NaN or infinite during optimisation."""

    def __init__(self, step: int, loss: float, hint: str = "") -> None:
        self.step = step
        self.loss = loss
        message = f"loss became {loss} at step {step}"
        if hint:
            message = f"{message}; {hint}"
        super().__init__(message)


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 6
_SHORT.maxstring = _SHORT.maxother = 80


def short_repr(value: object) -> str:
    """Return repr(value) cut short for an error message.

    reprlib stops at a depth and length limit while it walks the value, so a small YAML
    file whose anchors expand to millions of items still gives a short message.
    """
    return _SHORT.repr(value)
