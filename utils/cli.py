"""What every command shares: user errors become one `error:` line and exit code 2, flags become configs."""
import functools
import os
import sys

from config import T5ModelConfig, TrainConfig, TrainConfigPretrainLarge
from utils.errors import RunAborted, UserError, UserErrors
from utils.flags import FlagProblem, build, check_bounds, help_text, to_bool, to_float, to_int

EXIT_USER_ERROR = 2
EXIT_RUN_ABORTED = 1


def command(function):
    """Run a CLI command; a UserError prints `error: ...` (one line per problem) and exits 2, a RunAborted
    prints its reason and exits 1; neither shows a traceback."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        # Commands that take **flags would otherwise receive `--help` as an unknown flag.
        if kwargs.pop("help", False):
            print(run.__doc__)
            return None
        try:
            return function(*args, **kwargs)
        except UserError as error:
            report(error.problems if isinstance(error, UserErrors) else [str(error)])
            sys.exit(EXIT_USER_ERROR)
        except RunAborted as error:
            report([str(error)])
            sys.exit(EXIT_RUN_ABORTED)

    return run


def report(problems: list[str]) -> None:
    """Print `error:` lines once per machine: every rank of a node finds the same problems (the pre-flight reads
    the node's files; aborts are agreed), and N copies would bury them. Each node speaks, as disks may differ."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr, flush=True)


def flag_bool(name: str, value) -> bool:
    try:
        return to_bool(value)
    except FlagProblem as problem:
        raise UserError(f"--{name}={value!r} {problem}") from None


def checked_flag(name: str, value, converter, minimum):
    """One command-specific flag, converted and bounded like the config fields (a UserError names it)."""
    try:
        number = converter(value)
    except FlagProblem as problem:
        raise UserError(f"--{name}={value!r} {problem}") from None
    problem = check_bounds(name, number, {"min": minimum})
    if problem:
        raise UserError(problem)
    return number


def flag_int(name: str, value, minimum: int) -> int:
    return checked_flag(name, value, to_int, minimum)


def flag_float(name: str, value, minimum: float) -> float:
    return checked_flag(name, value, to_float, minimum)


def train_configs(use_large_config, flags: dict, extra: dict | None = None):
    """The train config (large or general) and the model config from the flags; plus any `extra` flags."""
    config_class = TrainConfigPretrainLarge if flag_bool("use_large_config", use_large_config) else TrainConfig
    (cfg, model_cfg), extras = build([config_class, T5ModelConfig], flags, extra)
    return (cfg, model_cfg, extras) if extra is not None else (cfg, model_cfg)


def large_config_defaults() -> str:
    general, large = TrainConfig(), TrainConfigPretrainLarge()
    changed = [f"{k}={v!r}" for k, v in vars(large).items() if getattr(general, k) != v]
    return "With --use_large_config=True these defaults change: " + ", ".join(changed)


def train_help() -> str:
    return "\n\n".join([help_text([TrainConfig, T5ModelConfig]), large_config_defaults()])
