"""Errors raised while reading checkpoints and running blocks."""


class BlocksError(Exception):
    """Base class of errors from the blocks package."""


class UnsupportedModelError(BlocksError):
    """The checkpoint describes an architecture this package cannot run."""


class CheckpointError(BlocksError):
    """The checkpoint directory is missing files or tensors."""
