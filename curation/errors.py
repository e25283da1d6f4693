"""The run's own error types: the problems a user fixes. The CLI prints these (and I/O errors on the user's own
paths) as one line and exits 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class CurationError(Exception):
    """Base of every error the user can act on."""


class ConfigError(CurationError, ValueError):
    """An option or config value that cannot work (a malformed template, a resolution PixArt has no buckets for)."""


class SetupError(CurationError, RuntimeError):
    """A problem with the run itself (lock held, config changed, no GPU, an upstream stage not run)."""


class ShardError(SetupError):
    """A shard failed for a reason outside the code (disk full, unwritable output, no model): the run stopped.

    Shards done before it stay done; the failed one left nothing visible, so a rerun after the fix resumes.
    """


class SourceError(CurationError, ValueError):
    """The input cannot be read as the layout it claims (wrong --source, unsafe or duplicate members, no
    annotations): one line naming the problem and the fix."""
