"""The one exception type for problems the user can fix (bad input, bad options, missing files).

The CLI turns it into exit code 2 and a one-line message; library callers can catch it (it is a
``ValueError``, so ``except ValueError`` keeps working).
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input or configuration. The message names the file, key or value and says what to do."""


class NonFiniteLossError(FloatingPointError):
    """A loss component became NaN or infinite; training stops before the optimizer applies it."""
