"""Turn a command's flags into checked dataclasses: the configs of a run and the flags of a command.

Fire hands every value over as the text the user typed (see `commands.cli`). Each is converted against its
field's declared type here, every problem is collected, and the caller gets either valid dataclasses or one
`UserErrors` listing each bad flag by name. Bounds (`config.bounded`) are declared once, on the class that
introduces a field; a subclass that only changes the default inherits them.
"""
import ast
import dataclasses
import difflib
import inspect
import math
import typing

from utils.errors import UserErrors

TRUE_WORDS = {"true": True, "1": True, "false": False, "0": False}


class FlagProblem(ValueError):
    """A value that does not fit its field; the message completes `--flag=value ...`."""


def to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS:
        return TRUE_WORDS[value.strip().lower()]
    raise FlagProblem("is not a boolean (use True/False/true/false/1/0)")


def to_int(value) -> int:
    if isinstance(value, bool):
        raise FlagProblem("is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return to_int(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError):
            pass
    raise FlagProblem("is not an integer")


def to_float(value) -> float:
    if isinstance(value, bool):
        raise FlagProblem("is not a number")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise FlagProblem("is not a number") from None
    else:
        raise FlagProblem("is not a number")
    # `nan` passes every bound (each comparison is False) and `inf` none usefully: neither is a setting.
    if not math.isfinite(number):
        raise FlagProblem("is not a finite number")
    return number


def to_str(value) -> str:
    if isinstance(value, str):
        return value
    raise FlagProblem("is not text")


def convert(value, annotation):
    """Convert one Fire value to `annotation` (bool, int, float, str, Literal or a Union of them)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        text = to_str(value).strip().lower() if not isinstance(value, bool) else None
        if text in choices:
            return text
        raise FlagProblem(f"is not one of {', '.join(map(str, choices))}")
    if origin is typing.Union:
        for option in typing.get_args(annotation):
            try:
                return convert(value, option)
            except FlagProblem:
                continue
        raise FlagProblem("is not " + " or ".join(describe(a) for a in typing.get_args(annotation)))
    return {bool: to_bool, int: to_int, float: to_float, str: to_str}[annotation](value)


def describe(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "/".join(map(str, typing.get_args(annotation)))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "text"}[annotation]


def field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def field_metadata(cls, name: str) -> dict:
    """A field's bounds and flags, from the first class along the MRO that declares them."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and declared.metadata:
            return dict(declared.metadata)
    return {}


def check_bounds(name: str, value, metadata) -> str | None:
    low, high = metadata.get("min"), metadata.get("max")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if low is not None and value < low:
        return f"--{name}={value} is below the minimum {low}"
    if high is not None and value > high:
        return f"--{name}={value} is above the maximum {high}"
    return None


def closest(name: str, choices) -> str | None:
    """The choice a typo most likely meant, if any is close enough."""
    guesses = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return guesses[0] if guesses else None


def build(classes: list, flags: dict) -> list:
    """Fill one instance of each dataclass in `classes` from `flags`: the command's flags are their fields.

    Returns the instances, or raises UserErrors naming every bad flag: unknown (with the closest of all the
    classes' fields), of the wrong type, out of bounds, or required and missing.
    """
    owners = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    problems, values, given = [], {cls: {} for cls in classes}, set()
    for name, raw in flags.items():
        name = name.replace("-", "_")
        if name not in owners:
            guess = closest(name, owners)
            problems.append(f"unknown flag --{name}" + (f" (did you mean --{guess}?)" if guess else " (see --help)"))
            continue
        given.add(name)
        annotation = field_types(owners[name])[name]
        try:
            values[owners[name]][name] = convert(raw, annotation)
        except FlagProblem as problem:
            problems.append(f"--{name}={raw!r} {problem}")
    instances = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            metadata = field_metadata(cls, f.name)
            if metadata.get("required") and f.name not in given:
                problems.append(f"--{f.name} is required (see --help)")
            elif f.name in values[cls]:
                problem = check_bounds(f.name, values[cls][f.name], metadata)
                if problem:
                    problems.append(problem)
        instances.append(cls(**values[cls]))
    if problems:
        raise UserErrors(problems)
    return instances


def field_docs(cls) -> dict[str, str]:
    """Each field's help: the string literal written under it in the class body (searched along the MRO)."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                    and isinstance(getattr(following, "value", None), ast.Constant)):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def help_text(classes: list) -> str:
    """A table of every flag, its default and its help, for `--help`."""
    lines = []
    for cls in classes:
        lines.append(f"{cls.__name__}: {' '.join(cls.__doc__.split())}")
        docs, default = field_docs(cls), cls()
        for f in dataclasses.fields(cls):
            value = " (required)" if field_metadata(cls, f.name).get("required") else f"={getattr(default, f.name)!r}"
            lines.append(f"  --{f.name}{value}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
