"""The ``capfilt`` command: one sub-command per stage; the work lives in the library."""

from __future__ import annotations

import inspect
import sys

import typer

from capfilt import __version__
from capfilt.cli import (
    bootstrap_cmds,
    config_cmds,
    convert_cmds,
    data_cmds,
    demo_cmds,
    eval_cmds,
    pipeline_cmds,
    report_cmds,
    train_cmds,
)
from capfilt.cli.common import (
    EXIT_USAGE,
    CliState,
    console,
    describe_error,
    fail,
    print_error,
    quiet_unless_main,
    styled,
)
from capfilt.utils.logging import setup_logging
from capfilt.utils.signals import EXIT_TERMINATED, terminate_as_interrupt, terminated

app = typer.Typer(
    name="capfilt",
    help=(
        "Bootstrap image-text training data the BLIP way: pretrain a MED model, fine-tune a "
        "captioner and a filter, caption and filter web shards, re-pretrain on the cleaned set."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _command(name: str, fn) -> None:
    """Register ``fn`` as ``capfilt NAME``, listed by its docstring's first paragraph on one line
    (typer's rich mode would keep the docstring's line breaks in the list of commands)."""
    summary = " ".join(inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].split())
    app.command(name, short_help=summary)(fn)


app.add_typer(data_cmds.app, name="data")
_command("demo", demo_cmds.demo)
_command("bootstrap", bootstrap_cmds.bootstrap)
_command("pretrain", train_cmds.pretrain)
app.add_typer(train_cmds.finetune_app, name="finetune")
_command("caption", pipeline_cmds.caption)
_command("filter", pipeline_cmds.filter_)
app.add_typer(config_cmds.app, name="config")
app.add_typer(eval_cmds.app, name="eval")
_command("report", report_cmds.report)
_command("convert", convert_cmds.convert)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"capfilt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    from capfilt.utils.dist import env_dist_info

    CliState.verbose = verbose
    rank = env_dist_info().rank
    quiet_unless_main(rank)
    setup_logging("DEBUG" if verbose else "INFO", rank=rank)
    from capfilt.data.remote import stall_seconds

    try:  # read here: a bad value would fail each remote shard as if a re-run could mend it
        stall_seconds()
    except ValueError as err:
        raise fail(str(err), EXIT_USAGE) from None


EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT), as shells report a process it stopped."""


def _interrupted(args: list[str]) -> str:
    """What to do after Ctrl-C or SIGTERM: the same command resumes; a training run needs
    --resume auto."""
    what = "terminated (SIGTERM)" if terminated() else "interrupted"
    command = next((a for a in args if not a.startswith("-")), "")
    if command in ("pretrain", "finetune") and "--resume" not in args:
        return f"{what}; re-run the same command with --resume auto to continue from its last checkpoint"
    return f"{what}; re-run the same command to resume"


def _stopped(args: list[str]) -> None:
    """Say how to resume (rank 0: under torchrun every rank gets the signal) and exit with the
    signal's code."""
    if CliState.rank == 0:
        console.print(styled(_interrupted(args), "yellow"))
    sys.exit(EXIT_TERMINATED if terminated() else EXIT_INTERRUPTED)


VERBOSE_FLAGS = ("-v", "--verbose")


def verbose_first(args: list[str]) -> list[str]:
    """``-v``/``--verbose`` moved to the front: it is the app's option, which click takes only
    before the command, and users add it at the end of a failed command (``-v`` is no command's
    own option; nothing after a ``--`` is moved)."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in VERBOSE_FLAGS]
    if not flags or all(a in VERBOSE_FLAGS for a in args[: len(flags)]):
        return args
    rest = [a for a in args[:end] if a not in VERBOSE_FLAGS]
    return [flags[0], *rest, *args[end:]]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps library errors to the documented exit codes (see describe_error).

    A user error prints one line, never a traceback; ``--verbose`` adds the traceback.
    """
    CliState.verbose = False
    quiet_unless_main(0)  # root() sets this process's rank
    terminate_as_interrupt()  # a scheduler's SIGTERM cleans up as Ctrl-C does
    given = sys.argv[1:] if argv is None else list(argv)
    args = verbose_first(given)
    try:
        app(args=args, standalone_mode=True)
    except SystemExit as done:
        if done.code == EXIT_INTERRUPTED:  # typer's exit for a KeyboardInterrupt
            _stopped(given)
        raise
    except KeyboardInterrupt:
        _stopped(given)
    except Exception as err:
        code, message = describe_error(err)
        if CliState.verbose:
            console.print_exception()
        print_error(message, code, rank_local=getattr(err, "rank_local", False))
        sys.exit(code)


if __name__ == "__main__":
    main()
