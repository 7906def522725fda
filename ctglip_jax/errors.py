"""User-facing input errors.

Every problem with a user's file or text raises a subclass of `CTGlipInputError` whose message names the
input and the problem. The CLI catches exactly this base class, prints its one-line message and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CTGlipInputError(Exception):
    """A bad input: `source` names the file (or '<stdin>', '<report>'), `problem` says what is wrong."""

    def __init__(self, source: object, problem: str):
        self.source = str(source) if source is not None else "<input>"
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class InputNotFoundError(CTGlipInputError, FileNotFoundError):
    """The path does not exist (or a DICOM folder holds no series)."""


class UnreadableFileError(CTGlipInputError):
    """The file exists but is not the format it claims (not a NIfTI, not DICOM)."""


class CorruptFileError(CTGlipInputError):
    """The header parses but the data cannot be read completely (truncated or damaged)."""


class VolumeShapeError(CTGlipInputError):
    """The image is not a 3-D volume (2-D slice, 4-D series, empty axis)."""


class NonFiniteVoxelError(CTGlipInputError):
    """NaN or Inf voxels: every later mean, window and loss would be silently poisoned."""


class InvalidGeometryError(CTGlipInputError):
    """Zero/negative spacing or a singular affine: voxel-to-world mapping is undefined."""


class MaskMismatchError(CTGlipInputError):
    """A label map whose shape or affine does not match its image."""


class UnknownLabelError(CTGlipInputError):
    """A label map holding ids outside the organ vocabulary."""


class ReportError(CTGlipInputError):
    """A report that is empty, undecodable, or speaks of no known organ."""


class WeightFormatError(CTGlipInputError):
    """Model weights in a format we refuse to load (pickle) or cannot find."""


class ConfigError(CTGlipInputError):
    """A configuration value that cannot work (unknown component name, bad shape, ...)."""
