"""User-facing errors: one clear line, no traceback (unless --debug)."""


class SaescopeError(Exception):
    """An error the user can fix. `str(err)` is the one line shown to them.

    Raise it with what went wrong *and* how to fix it, e.g.
    ``SaescopeError("corpus 'x.txt' is empty: give a file with text in it")``.
    """
