"""The one error type of the command line.

Sub-command modules raise :class:`CLIError` for a mistake the user can fix; :func:`vist2.cli.main`
prints it as ``vist2: error: ...`` and exits with code 2. It lives apart from :mod:`vist2.cli`
so that the sub-commands, which ``vist2.cli`` imports to build its parser, need not import it back.
"""


class CLIError(Exception):
    """A mistake in the command line: printed as ``vist2: error: ...`` with exit code 2."""
