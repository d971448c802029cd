"""Shared CLI pieces: recipe loading with overrides, exit codes, error reporting."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text

from capfilt.config import ConfigError, Recipe, dump_yaml, load_recipe, shipped_recipe_names
from capfilt.config.core import parse_override
from capfilt.data.shards import ShardSpecError
from capfilt.data.stage import OutputFolderError, StageError
from capfilt.utils.lock import FolderInUseError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

# Markup off: paths, captions and origins are user data, and "[/]" or "[bold]" in them must print
# as written (with markup on, rich parses them: a MarkupError, or text silently removed). Styled
# output is built as rich Text instead.
# Soft wrap: a long path stays one line that can be copied (rich would fold it).
console = Console(stderr=True, markup=False, soft_wrap=True)
out = Console(markup=False, soft_wrap=True)


class CliState:
    """Options of the root command that error reporting needs."""

    verbose: bool = False
    rank: int = 0
    """This process's rank under torchrun (0 otherwise)."""


def quiet_unless_main(rank: int) -> None:
    """Under torchrun every rank runs the command: results and the command's own warnings are
    the job's, printed by rank 0; another rank prints only errors of its own (see
    :func:`print_error`). Library log lines say their rank themselves."""
    CliState.rank = rank
    out.quiet = rank > 0


def styled(label: str, style: str, message: str = "") -> Text:
    """``label`` in ``style``, then ``message`` as plain text."""
    return Text.assemble((label, style), f" {message}" if message else "")


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe field, e.g. --set train.lr=1e-4 (repeatable; `capfilt config explain` lists the keys).",
        metavar="KEY=VALUE",
    ),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")
]
RecipeArgument = Annotated[
    str,
    typer.Argument(
        help=f"Recipe: a YAML path or a shipped name ({', '.join(shipped_recipe_names())}).",
        show_default=True,
    ),
]


def print_error(message: str, code: int = EXIT_FAILURE, rank_local: bool = False) -> None:
    """``error: message``; from a rank other than 0, named by rank, and left out for a usage
    error (exit 2) that is not ``rank_local``: those come from checks of the command line and
    inputs that every rank makes alike, so rank 0 says it once. A rank's own shard can also fail
    with one (a bad setting met in its data, a read-only folder on its node): ``rank_local``."""
    if CliState.rank > 0:
        if code == EXIT_USAGE and not rank_local:
            return
        console.print(styled(f"error [rank {CliState.rank}]:", "bold red", message))
        return
    console.print(styled("error:", "bold red", message))


def print_warning(message: str) -> None:
    if CliState.rank > 0:  # the command's own warnings: every rank would print the same
        return
    console.print(styled("warning:", "bold yellow", message))


def warn_of_another_recipe(model: str | Path, recipe: Recipe, command: str, section: str) -> None:
    """Say so when ``model`` was trained with another recipe than the one whose ``section``
    settings this ``command`` runs with (e.g. the default ``demo`` beside a ``real-cpu`` model)."""
    from capfilt.runs.resolve import training_recipe_name

    trained = training_recipe_name(model)
    if trained is not None and trained != recipe.name:
        print_warning(
            f"{model} was trained with recipe '{trained}'; this run takes its {section}.* "
            f"settings from recipe '{recipe.name}' (name the recipe to change that: "
            f"capfilt {command} {trained} ...)"
        )


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    print_error(message, code)
    return typer.Exit(code)


_PATH_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
_SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def describe_error(err: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an exception that reached the command line.

    The one place that maps library errors to exit codes: a wrong recipe, option, path or input
    file exits 2 (usage); a folder another job holds, or whose shards a stage's would mix with,
    exits 2; a full disk exits 1 (free space and re-run: finished shards and checkpoints are
    kept); anything else exits 1 with its type and message (``--verbose`` prints the traceback).
    """
    if isinstance(err, ConfigError | ShardSpecError | FolderInUseError | OutputFolderError):
        return EXIT_USAGE, str(err)
    if isinstance(err, StageError):
        return EXIT_FAILURE, str(err)
    if _peer_gone(err):
        return EXIT_FAILURE, (
            "another process of this torchrun job stopped (its error is above, or in its log); "
            "this one stopped with it"
        )
    if isinstance(err, pickle.UnpicklingError):
        return EXIT_USAGE, f"not a readable checkpoint: {err}"
    if isinstance(err, OSError) and err.errno is not None:
        where = err.filename if err.filename is not None else ""
        if err.errno in _PATH_ERRNOS:
            reason = _PATH_ERRNOS[err.errno]
            return EXIT_USAGE, f"{where}: {reason}" if where else reason
        if err.errno in _SPACE_ERRNOS:
            return EXIT_FAILURE, (
                f"{_SPACE_ERRNOS[err.errno]} while writing {where or 'the output'}; free space and "
                "re-run the same command (finished shards and checkpoints are kept)"
            )
    text = str(err).splitlines()[0] if str(err) else ""
    name = type(err).__name__
    return EXIT_FAILURE, (
        f"{name}: {text}" if text else name
    ) + " (capfilt --verbose ... prints the traceback)"


PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
)
"""What gloo's and NCCL's collectives say when a process they wait on has died."""


def _peer_gone(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank of the job stopped."""
    import sys

    if "torch.distributed" not in sys.modules:
        return False
    return isinstance(err, RuntimeError) and any(text in str(err) for text in PEER_GONE)


def stage_names(values: list[str] | None) -> tuple[str, ...]:
    """``--skip``/``--only`` values, repeated or comma-separated (``--skip caption,filter``)."""
    return tuple(name.strip() for v in values or () for name in v.split(",") if name.strip())


def resolve(
    recipe: str,
    overrides: list[str] | None,
    dry_run: bool = False,
    shortcuts: dict | None = None,
    reads: tuple[str, ...] | None = None,
) -> Recipe:
    """Load the recipe with overrides; config errors exit 2; ``--dry-run`` prints it and exits 0.

    ``shortcuts`` maps recipe keys to the values of dedicated options (``--threshold`` for
    ``filter.threshold``); those given (not None) apply after the ``--set`` overrides.
    ``reads``: the recipe sections the command uses (``runtime`` always); an override of
    another section is named as having no effect.
    """
    overrides = list(overrides or []) + [
        f"{key}={value}" for key, value in (shortcuts or {}).items() if value is not None
    ]
    try:
        cfg = load_recipe(recipe, overrides)
    except ConfigError as err:
        raise fail(str(err), EXIT_USAGE) from None
    if reads is not None:
        keys = [".".join(parse_override(item)[0]) for item in overrides]
        unread = [k for k in keys if "." in k and k.split(".")[0] not in (*reads, "runtime")]
        if unread:
            sections = ", ".join(f"{section}.*" for section in (*reads, "runtime"))
            print_warning(
                f"{', '.join(unread)}: not used by this command, which reads {sections}; "
                "the setting has no effect here"
            )
    if dry_run:
        if out.is_terminal:
            out.print(Syntax(dump_yaml(cfg), "yaml"))
        else:  # plain YAML that scripts can parse (rich would wrap long lines)
            typer.echo(dump_yaml(cfg), nl=False)
        raise typer.Exit(EXIT_OK)
    return cfg


def report_stage(result, what: str) -> None:
    """Print a shard stage's counts (the whole folder's: once, by rank 0 under torchrun); exit 3
    (partial) when some of this rank's shards failed."""
    from capfilt.utils.dist import current_dist_info

    stats = result.stats
    if current_dist_info().is_main:
        out.print(
            f"{what}: {stats['count']} samples written of {stats['input_count']} read, in "
            f"{result.out_dir}"
        )
        for reason, count in stats["skipped"].items():
            out.print(f"  skipped {count} bad input sample(s): {reason}")
    if result.partial:
        out.print(
            styled(
                f"{len(result.failed)} shard(s) failed; re-run the same command to retry", "yellow"
            )
        )
        raise typer.Exit(EXIT_PARTIAL)


def report_origins(summary_path: Path) -> None:
    """Print a filter summary's kept fraction per text origin (origins come from the data)."""
    if not summary_path.is_file():
        return
    for origin, info in json.loads(summary_path.read_text()).get("origins", {}).items():
        out.print(
            f"  {origin:>9}: kept {info['kept']} of {info['texts']} texts ({100 * info['kept_fraction']:.1f}%)"
        )


def print_stage_event(event) -> None:
    """One line per bootstrap/demo stage event, saying where its output is."""
    where = f"→ {event.output}"
    if event.status == "start":
        out.print(styled(f"{event.key}:", "bold", f"running {where}"))
    elif event.status == "done":
        out.print(styled(f"{event.key}:", "bold", f"done in {event.seconds:.1f} s {where}"))
    elif event.status == "done-earlier":
        out.print(f"{event.key}: done earlier {where}")
    elif event.status == "skipped":
        out.print(f"{event.key}: skipped (--skip/--only)")
    else:
        out.print(styled(f"{event.key}: some shards failed {where}; re-run to retry", "yellow"))
