"""Checkpoint errors: every message names the file."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or holds no usable table."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to run code (a pickle global outside the allow-list)."""
