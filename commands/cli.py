"""What every command shares: its flags become checked dataclasses, user errors become one `error:` line and exit
code 2, and a mistyped command name is caught before Fire prints its usage text.

Fire is the entry point and parses the command line once. Every command is marked `SetParseFn(str)`, so Fire hands
each value over exactly as typed (`--prompt=1e5` stays the text "1e5", `--train_file=a,b` stays "a,b"), and
`commands.flags` converts it against the field's declared type.
"""
import functools
import inspect
import os
import sys

import fire

from commands.flags import FlagProblem, build, closest, help_text, to_bool
from config import ConfigChoice, GivenFlags, TrainConfig, TrainConfigDPO, TrainConfigPretrainLarge, TrainConfigSFT
from utils.errors import RunAborted, UserError, UserErrors

EXIT_USER_ERROR = 2
EXIT_RUN_ABORTED = 1
EXIT_BROKEN_PIPE = 141  # as a shell reports a process ended by SIGPIPE
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C
# What Fire is shown of every command, so that it hands over every argument: with the real signature it reports
# unknown flags and missing arguments itself, in several lines of usage text, and only after the command ran.
TAKES_EVERYTHING = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                                      inspect.Parameter("flags", inspect.Parameter.VAR_KEYWORD)])


def command(function):
    """A CLI command whose parameters are typed by the dataclasses whose fields are its flags, e.g.
    `def plan(flags: PlanFlags, cfg: TrainConfig, model_cfg: T5ModelConfig)`. A parameter typed `GivenFlags`
    receives the names of the flags the user typed.

    Every flag is checked against them before the command runs: each problem is one `error:` line, exit code 2.
    A RunAborted while it runs prints its reason and exits 1. Neither shows a traceback.
    """
    parameters = [parameter.annotation for parameter in inspect.signature(function).parameters.values()]
    classes = [cls for cls in parameters if cls is not GivenFlags]

    @fire.decorators.SetParseFn(str)
    @functools.wraps(function)
    def run(*args, **flags):
        # Fire passes `--help` (and `-h`) on as flags, since the command takes any flag.
        if flags.pop("help", False) or flags.pop("h", False):
            print(command_help(function, classes))
            return
        try:
            instances = iter(parse(classes, args, flags))
            given = GivenFlags(name.replace("-", "_") for name in flags)
            function(*(given if cls is GivenFlags else next(instances) for cls in parameters))
        except UserError as error:
            problems = error.problems if isinstance(error, UserErrors) else [str(error)]
            leave(report(problems, EXIT_USER_ERROR, error.every_rank), error.every_rank)
        except RunAborted as error:
            leave(report([str(error)], EXIT_RUN_ABORTED, error.every_rank), error.every_rank)
        except KeyboardInterrupt:
            # Ctrl-C before training's own handler is in place (a tokenizer being trained, tokens being counted) or
            # in another command, which write their files whole or not at all: one line instead of a traceback.
            leave(report(["interrupted (Ctrl-C)"], EXIT_INTERRUPTED), True)

    run.__signature__ = TAKES_EVERYTHING
    return run


def parse(classes: list, args: tuple, flags: dict) -> list:
    """One instance of each class from the command's flags (text, as typed), or UserErrors naming every problem.

    A command that takes a TrainConfig also takes --use_large_config, which makes it a TrainConfigPretrainLarge;
    without it, --objective=dpo makes it a TrainConfigDPO, and otherwise --is_finetune=True a TrainConfigSFT.
    """
    problems = [f"unexpected argument {value!r}: flags are written --name=value (quote a value with spaces)"
                for value in args]
    choice = [ConfigChoice] if TrainConfig in classes else []
    chosen = (TrainConfigPretrainLarge if is_true(flags, "use_large_config")
              else TrainConfigDPO if str(flags.get("objective", "")).strip().lower() == "dpo"
              else TrainConfigSFT if is_true(flags, "is_finetune") else TrainConfig)
    if choice:
        classes = [chosen if cls is TrainConfig else cls for cls in classes]
    try:
        instances = build(choice + classes, flags)[len(choice):]
    except UserErrors as errors:
        problems += errors.problems
    if problems:
        raise UserErrors(problems)
    return instances


def is_true(flags: dict, name: str) -> bool:
    try:
        return to_bool(flags.get(name, "False"))
    except FlagProblem:
        return False  # `build` reports the bad value


def command_help(function, classes: list) -> str:
    parts = [inspect.cleandoc(function.__doc__)]
    if TrainConfig in classes:
        parts += [help_text([ConfigChoice] + classes),
                  other_defaults(TrainConfigPretrainLarge, "--use_large_config=True"),
                  other_defaults(TrainConfigSFT, "--is_finetune=True (without --use_large_config)"),
                  other_defaults(TrainConfigDPO, "--objective=dpo (without --use_large_config)")]
    else:
        parts.append(help_text(classes))
    return "\n\n".join(parts)


def other_defaults(variant, flag: str) -> str:
    general = TrainConfig()
    changed = [f"{k}={v!r}" for k, v in vars(variant()).items() if getattr(general, k) != v]
    return f"With {flag} these defaults change: " + ", ".join(changed)


def main(commands: dict, argv: list[str] | None = None) -> None:
    """Run the command named first on the command line (`argv`, default sys.argv[1:]) through Fire. A missing or
    unknown name is one `error:` line (Fire would print its usage text); `--help` lists the commands. Output cut
    short by its reader (`train --help | head`) ends the command quietly."""
    try:
        dispatch(commands, sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:
        # Python would print a traceback when it flushes stdout at exit: point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


def dispatch(commands: dict, argv: list[str]) -> None:
    name = argv[0] if argv else ""
    if name in ("-h", "--help"):
        print("commands (python train_low_mem.py COMMAND --help lists the flags of each):")
        for command_name, function in commands.items():
            print(f"  {command_name:<17}{inspect.cleandoc(function.__doc__).splitlines()[0]}")
        return
    if name not in commands:
        guess = closest(name, commands) if name else None
        what = (f"unknown command {name!r}" if name else "no command") + (f" (did you mean {guess}?)" if guess else "")
        sys.exit(report([f"{what}; the commands are {', '.join(commands)} (see --help)"], EXIT_USER_ERROR))
    repeated = repeated_flags(argv[1:])
    if repeated:  # Fire would keep the last value silently: a command line that says two things is a mistake
        sys.exit(report([f"--{name} is given {count} times: give it once" for name, count in repeated],
                        EXIT_USER_ERROR))
    fire.Fire(commands, command=argv)


def repeated_flags(arguments: list[str]) -> list[tuple[str, int]]:
    """Flags named more than once (`--a=1 --a 2`, `--a-b` and `--a_b` alike), with their counts, in order."""
    names = [argument[2:].split("=", 1)[0].replace("-", "_") for argument in arguments
             if argument.startswith("--") and len(argument) > 2]
    return [(name, names.count(name)) for name in dict.fromkeys(names) if names.count(name) > 1]


def leave(exit_code: int, every_rank: bool) -> None:
    """Exit. After a stop only this rank knows of, the others may be waiting for it inside a collective, and the
    interpreter's own shutdown (joining library threads) could wait for them in turn: such a rank ends at once,
    so that the launcher sees it fail and stops the others."""
    if every_rank:
        if exit_code and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            outlive_the_other_ranks()
        sys.exit(exit_code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def outlive_the_other_ranks(timeout: float = 10.0) -> None:
    """The rank that reports an error every rank agreed on leaves after the others of its machine (which exit 0):
    a launcher stops every rank as soon as one fails, and its report would show them killed (SIGTERM) instead of
    finished. They are this process's siblings, the launcher's children."""
    import psutil

    this = psutil.Process()
    siblings = [process for process in this.parent().children() if process.pid != this.pid]
    psutil.wait_procs(siblings, timeout=timeout)


def report(problems: list[str], exit_code: int, every_rank: bool = True) -> int:
    """Print `error:` lines and return the process's exit code.

    A problem every rank of a machine finds alike (the pre-flight reads that machine's files; aborts are agreed)
    is printed by the machine's first rank only, which exits with `exit_code`; the others exit 0, because a launcher
    (torchrun, accelerate launch) kills every rank as soon as one fails and could cut the first one off before it
    printed. A problem of one rank only (a read failing mid-run) is printed by that rank, which exits non-zero.
    """
    if not every_rank:
        rank = os.environ.get("RANK")
        problems = [f"[rank {rank}] {problem}" if rank else problem for problem in problems]
    elif int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr, flush=True)
    return exit_code
