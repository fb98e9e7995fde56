"""Errors a user can fix: a bad config value, a missing file, a malformed data row.

`UserError` is the base of every error that means "your input is wrong", not "the
code is wrong". ``python -m rlhf_jax.run`` prints it as one line (``error: ...``,
naming the key, the file and line, or the shape) and exits with status 2, without
a traceback. Everything here is a ``ValueError``, so library callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(ValueError):
  """Bad input from the user (config, files, data); reported in one line, exit status 2."""


class ConfigError(UserError):
  """A config key with a bad value, named in the message (``config.data.format='x': ...``)."""
