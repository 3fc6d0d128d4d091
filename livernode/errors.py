"""One exception class per stage. Each carries a reason a person can act on; the CLI prints it as one line."""

from __future__ import annotations


class LivernodeError(Exception):
    """Base class: an expected failure with a human-readable reason (no traceback shown)."""


class ConfigError(LivernodeError):
    """A configuration file or flag is invalid; the message names the key path."""


class InputError(LivernodeError):
    """An input file (DICOM, PNG, NIfTI) cannot be read or is inconsistent; the message names the file."""


class DatasetError(InputError):
    """A case's images and masks do not match in count, shape or geometry."""


class SeriesRejected(InputError):
    """A DICOM series cannot be turned into a regular axial volume (gaps, tilt, mixed geometry)."""


class MissingExtra(LivernodeError):
    """An optional dependency group is not installed."""


class TrainingError(LivernodeError):
    """Training could not run or produced no usable model."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C stopped training after saving a resumable checkpoint."""


class ExportError(LivernodeError):
    """Export to ONNX failed or the exported model disagrees with the Keras model."""


class ManifestError(LivernodeError):
    """A model's embedded manifest is missing or invalid."""


class EvaluationError(LivernodeError):
    """Evaluation could not be completed."""


class StudyInterrupted(LivernodeError):
    """Processing stopped between two steps because the node is shutting down; the study stays due."""
