"""User-facing errors: the CLI prints them as one `error: ...` line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad file, bad data). Never shown with a traceback.

    The message names the flag or file and says what is wrong, without the leading `error:`.
    """

    every_rank = True
    """Raised alike on every rank (flags, pre-flight, agreed checks): one report per machine is enough."""


class UnreadableData(UserError):
    """A data file that failed while one rank read it mid-run: only that rank knows, so that rank reports it."""

    every_rank = False


class UserErrors(UserError):
    """Several user mistakes found at once; printed one `error:` line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RunAborted(Exception):
    """Training cannot go on (diverged, out of memory at batch 1); what was saved before stays usable.

    Printed as one `error:` line with exit code 1: not a usage mistake, but no traceback helps the user either.
    """

    every_rank = True
    """Decided alike on every rank (they agreed): one report per machine is enough."""


class RankAborted(RunAborted):
    """A stop only this rank knows of (out of memory where the ranks cannot agree): this rank reports it."""

    every_rank = False
