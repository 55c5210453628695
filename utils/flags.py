"""Turn Fire's keyword arguments into checked config dataclasses.

Fire's parsing is untrusted: it turns `false` into the string 'false', `1,2` into a tuple and `5.0` into a float.
Every value is converted against its field's declared type here, every problem is collected, and the caller gets
either valid dataclasses or one `UserErrors` listing each bad flag by name.
"""
import ast
import dataclasses
import difflib
import inspect
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
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise FlagProblem("is not a number")


def to_str(value) -> str:
    # `--train_file=a.parquet,b.parquet` may reach us as a tuple; paths and tracker lists are comma-joined text.
    if isinstance(value, (tuple, list)):
        return ",".join(to_str(item) for item in value)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
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


def check_bounds(name: str, value, metadata) -> str | None:
    low, high = metadata.get("min"), metadata.get("max")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if low is not None and value < low:
        return f"--{name}={value} is below the minimum {low}"
    if high is not None and value > high:
        return f"--{name}={value} is above the maximum {high}"
    return None


def build(classes: list, flags: dict, extra: dict | None = None) -> tuple[list, dict]:
    """Fill one instance of each dataclass in `classes` from `flags`; `extra` maps other accepted flags to types.

    Returns the instances and the converted extra flags, or raises UserErrors naming every bad flag.
    """
    extra = extra or {}
    owners = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    problems, values, extras = [], {cls: {} for cls in classes}, {}
    for name, raw in flags.items():
        name = name.replace("-", "_")
        if name not in owners and name not in extra:
            known = list(owners) + list(extra)
            guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (did you mean --{guess[0]}?)" if guess else " (see --help)"
            problems.append(f"unknown flag --{name}{hint}")
            continue
        annotation = extra[name] if name in extra else field_types(owners[name])[name]
        try:
            converted = convert(raw, annotation)
        except FlagProblem as problem:
            problems.append(f"--{name}={raw!r} {problem}")
            continue
        if name in extra:
            extras[name] = converted
        else:
            values[owners[name]][name] = converted
    instances = []
    for cls in classes:
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
        instance = cls(**values[cls])
        for name, value in dataclasses.asdict(instance).items():
            problem = check_bounds(name, value, meta[name])
            if problem and name in values[cls]:
                problems.append(problem)
        instances.append(instance)
    if problems:
        raise UserErrors(problems)
    return instances, extras


def changed_fields(instance) -> dict:
    """The fields whose value differs from the class default: what the user changed."""
    default = type(instance)()
    return {k: v for k, v in dataclasses.asdict(instance).items() if getattr(default, k) != v}


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
        lines.append(f"{cls.__name__}: {cls.__doc__}")
        docs, default = field_docs(cls), cls()
        for f in dataclasses.fields(cls):
            lines.append(f"  --{f.name}={getattr(default, f.name)!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
