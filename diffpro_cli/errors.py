"""User-facing errors and the stable exit codes the CLI maps them to.

Every error a user can cause is raised as a `DiffproError` with a one-line message that names the
problem and the fix; the CLI prints that line (no traceback) and exits with the error's code.
"""

EXIT_OK = 0
EXIT_FAILURE = 1          # an unexpected internal error (a bug): traceback shown
EXIT_USAGE = 2            # bad option or argument value (same code as typer/click usage errors)
EXIT_INPUT = 3            # missing / unreadable / corrupt / mismatched input
EXIT_BUDGET = 4           # infeasible budget or constraint
EXIT_UNTRUSTED = 5        # refusing to run code or unpickle without --trust-code
EXIT_INTERRUPTED = 130


class DiffproError(Exception):
    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(DiffproError):
    exit_code = EXIT_USAGE


class InputError(DiffproError):
    exit_code = EXIT_INPUT


class BudgetError(DiffproError):
    exit_code = EXIT_BUDGET


class TrustError(DiffproError):
    exit_code = EXIT_UNTRUSTED
