"""The one error type the exporter raises for problems the user can fix."""
from __future__ import annotations


class ExportError(Exception):
    """A problem with the user's input or environment, with a one-line message naming the problem and the fix.

    The CLI prints the message alone (no traceback) and exits with status 2.
    """


class ParityError(ExportError):
    """An exported component disagrees with its PyTorch original by more than the tolerance."""
