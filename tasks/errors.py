"""One exception class per condition. Messages say what is wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class KilnError(Exception):
    """Base of every error modelkiln reports to the user without a traceback: the problem,
    then the fix on a line of its own, so every message reads the same way."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


def problem_of(err: BaseException) -> str:
    """A KilnError's problem without its fix line, for a message that quotes it."""
    return str(err).split("\n  fix: ")[0]


class RecipeError(KilnError):
    """A recipe that cannot be built: bad TOML, unknown key, wrong type, dangling `from`, ..."""

    def __init__(self, file: str, where: str, problem: str, fix: str = "") -> None:
        super().__init__(f"{file}: [{where}] {problem}" if where else f"{file}: {problem}", fix)


class UsageError(KilnError):
    """A command that asks for what cannot be (an unknown step, a bad option value, a remote
    command and no remote): nothing ran, and the exit code is 3, as for a wrong recipe."""


class StageError(KilnError):
    """A step failed for a reason the user can act on (bad input model, corrupt file, ...)."""


class PreflightError(StageError):
    """A step cannot start: a missing extra, the wrong input format, no GPU."""


class StoreError(KilnError):
    """The artifact store is inconsistent: a manifest that does not match its files."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean x?)' for the closest choice, or ''."""
    import difflib  # only when a name is wrong: every doit run imports this module

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_variables(argv: Sequence[str], known: Sequence[str]) -> None:
    """doit takes every `name=value` argument as a variable and the build reads only the known
    ones: a misspelt one would quietly build the default recipe instead."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if not arg.startswith("-") and "=" in arg and name not in known:
            raise KilnError(
                f"unknown variable {name}={arg.split('=', 1)[1]!r}{did_you_mean(name, known)}",
                f"the variables are {', '.join(f'{k}=...' for k in known)}",
            )
