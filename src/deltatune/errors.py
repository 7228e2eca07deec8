"""Typed errors. Every error names the file, tensor, module or field at fault and what was expected."""

from __future__ import annotations


class DeltaTuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltaTuneError, ValueError):
    """A configuration field is missing, unknown or out of range."""


class TargetError(DeltaTuneError, ValueError):
    """A target pattern matched no module (the message lists what is available)."""


class FingerprintMismatch(DeltaTuneError):
    """A delta was applied to a base model other than the one it was trained on."""


class DeltaFormatError(DeltaTuneError):
    """A delta directory is malformed: manifest fields, tensor files, shapes or dtypes."""


class ShapeMismatch(DeltaFormatError):
    """A tensor has a different shape or dtype than the manifest or the base module expects."""


class DataError(DeltaTuneError, ValueError):
    """A data file cannot be read as the task expects (missing file, column or label)."""


class TrainingDiverged(DeltaTuneError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, step: int, loss: float, checkpoint: str | None, tensor: str | None = None) -> None:
        self.step = step
        self.loss = loss
        self.checkpoint = checkpoint
        self.tensor = tensor
        where = f"; last good checkpoint kept at {checkpoint}" if checkpoint else "; no checkpoint was written yet"
        what = f"trainable tensor {tensor!r} is not finite" if tensor else f"loss is {loss}"
        super().__init__(f"{what} at optimizer step {step}{where}")


class IntegrityError(DeltaFormatError):
    """A stored digest does not match the content read back (bit rot, tampering, a partial copy)."""


class NonFiniteError(DeltaFormatError):
    """A tensor or a stored number holds NaN or ±Inf where a finite value is required."""


class OutputExists(DeltaTuneError, FileExistsError):
    """An output path already holds something that is not an earlier output of the same kind.

    Pass ``--overwrite`` (``overwrite=True``) to replace it anyway."""


class DiskFull(DeltaTuneError, OSError):
    """The disk filled up (ENOSPC) while writing; the previous output, if any, is left intact."""


class InputTooLarge(DeltaTuneError, ValueError):
    """An input exceeds a safety bound (expanded YAML size, number of inputs, tensor element count)."""


class NotMergeable(DeltaTuneError, ValueError):
    """An operation that folds deltas into weights (merge, compose, compress, rebase, apply with merging) was
    given a part kind that lacks the capability it needs; ``module`` and ``kind`` name the first such part."""

    def __init__(self, message: str, module: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.module, self.kind = module, kind


class OutputNotWritable(DeltaTuneError, PermissionError):
    """A report or plot folder cannot be written (no permission, or a parent is a file); the message names the
    folder and the reason.  Raised before any work is done."""
