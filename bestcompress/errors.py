"""Errors a user can cause. The CLI prints their message (one sentence) and exits with code 2."""


class BestcompressError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""


class CheckpointError(BestcompressError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the architecture."""


class RecipeError(BestcompressError):
    """A recipe file or override has an unknown key, a wrong type or a bad value."""


class ModelError(BestcompressError):
    """The model cannot be built, traced or transformed as asked."""


class DataError(BestcompressError):
    """A dataset is missing, empty or does not fit the model."""


class ExportError(BestcompressError):
    """An export failed, or the exported graph does not compute what PyTorch computes."""


class ReportError(BestcompressError):
    """A report cannot be made from what was given (no run folder, no metrics, nothing to show)."""


class DeviceError(BestcompressError):
    """The device asked for does not exist on this machine or is not a device name."""


def short_reason(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to `limit` characters (its class name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
