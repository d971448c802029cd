"""The epoch sizes a chained run must be given, found before its first stage.

A training stage sizes its epoch from its shards' sample counts (``sizes.json``, local or in
an http(s) shard's remote folder); a remote source without one (a ``pipe:`` command, gs://,
hf://, a server folder without ``sizes.json``) needs ``*.samples_per_epoch`` set. Each training
stage would find that out only when it starts, one failed run per setting, so the loop asks for
them all at once (README: Shard format).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from capfilt.config import ConfigError, Recipe
from capfilt.data.sample_counts import sample_count
from capfilt.data.shards import REMOTE_PREFIXES, expand_shards

EPOCH_KEYS = {
    "finetune-captioner": ("finetune.captioner", lambda r: r.finetune.captioner),
    "finetune-filter": ("finetune.filter", lambda r: r.finetune.filter),
}
"""A fine-tuning stage → its config section; every ``pretrain-*`` stage reads ``train``."""


def _section(stage: str, recipe: Recipe) -> tuple[str, Any] | None:
    if stage in EPOCH_KEYS:
        key, get = EPOCH_KEYS[stage]
        return key, get(recipe)
    if stage.startswith("pretrain-"):
        return "train", recipe.train
    return None


def unknown_size_specs(specs: Iterable[str], known: dict[str, bool]) -> list[str]:
    """The remote specs among ``specs`` whose sample count cannot be known (``known`` caches the
    answer per spec: a remote folder's ``sizes.json`` is fetched once). A local spec is always
    countable, and may not exist yet (a folder an earlier stage writes)."""
    unknown = []
    for spec in specs:
        if not str(spec).startswith(REMOTE_PREFIXES):
            continue
        if spec not in known:
            known[spec] = sample_count(expand_shards(spec)).samples is not None
        if not known[spec]:
            unknown.append(spec)
    return unknown


def check_epoch_sizes(recipe: Recipe, steps: Iterable[Any]) -> None:
    """Raise one :class:`ConfigError` naming every ``samples_per_epoch`` the training ``steps``
    (bootstrap's ``Step``s that will run) need and lack, with the stages that need each."""
    known: dict[str, bool] = {}
    needs: dict[str, list[str]] = {}
    unknown: dict[str, None] = {}
    for step in steps:
        section = _section(step.stage, recipe)
        if section is None or section[1].samples_per_epoch > 0:
            continue
        missing = unknown_size_specs(step.inputs, known)
        if missing:
            needs.setdefault(f"{section[0]}.samples_per_epoch", []).append(step.key)
            unknown.update(dict.fromkeys(missing))
    if not needs:
        return
    wanted = "; ".join(f"{key} (for {', '.join(keys)})" for key, keys in needs.items())
    pretrains = (
        "; train.samples_per_epoch sizes every pretrain alike, and the sources of a pretrain then "
        "mix by shard count"
        if "train.samples_per_epoch" in needs
        else ""
    )
    raise ConfigError(
        f"the size of {', '.join(unknown)} is unknown (no sizes.json beside its shards), so this "
        f"run needs the epoch size of each stage that trains on it: set {wanted} (e.g. --set "
        f"{next(iter(needs))}=N), or put a sizes.json beside those shards{pretrains}"
    )
