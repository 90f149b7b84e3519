"""The errors a user can cause. Each carries a one-line message that says what to do; the CLI prints it."""


class CtxEditError(Exception):
    """Base of every error caused by input, settings or the environment rather than by a bug."""

    exit_code = 1


class UsageError(CtxEditError):
    """A bad flag value or combination."""

    exit_code = 2


class VideoError(CtxEditError):
    """A video that is missing, unreadable, too short or cannot be written."""


class ModelError(CtxEditError):
    """Weights that are missing, offline, or not a diffusers Stable Diffusion 1.x model."""


class RunError(CtxEditError):
    """A run directory that is missing, incomplete, or would be overwritten."""


class TuningDiverged(CtxEditError):
    """The loss became NaN or inf; the last good parameters were kept."""


class Interrupted(CtxEditError):
    """Ctrl-C; what was done so far was saved."""

    exit_code = 130


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (its class name if it has none), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
