"""The one base class of errors a user causes and can fix.

The CLI catches `UserError` and prints its message on one line with exit code 2; every check
that raises one runs before Ray or MLflow start, so a typo never costs a cluster start-up or
leaves a half-written MLflow run behind.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data folder, weights file, pool entry, store): the message says what to
    change. Anything else that escapes is a bug or a failed trial, not the user's doing."""
