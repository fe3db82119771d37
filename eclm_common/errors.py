"""The one error every role's command line shares.

UsageError(ValueError)   command-line arguments that do not fit together (exit code 2)
"""

from __future__ import annotations


class UsageError(ValueError):
    """Arguments a command cannot run with; the message names the option."""
