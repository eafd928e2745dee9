"""``tta adapt --per-input``: one adapted model per input (a fleet of cameras, one model each).

Every input given on the command line (a folder, a video, a list) is adapted on its own, each run
from the source model as a separate ``tta adapt`` of that input would be, into ``OUT/<input
name>/``. Launched by ``torchrun``, the inputs are dealt over the ranks (input i to rank i mod N);
each rank runs its inputs alone, one after another, with one process's semantics (no collectives).
Without torchrun one process runs them all, one after another.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from tta_cli import distributed
from tta_cli.config import AdaptConfig
from tta_cli.errors import TTAError
from tta_cli.runtime import refuse_non_empty


def input_names(inputs: list[Path]) -> list[str]:
    """The sub-folder of each input: its file or folder name, which must be unique."""
    names = [Path(path).name or Path(path).resolve().name for path in inputs]
    seen: dict[str, Path] = {}
    for name, path in zip(names, inputs, strict=True):
        if name in seen:
            raise TTAError(f"--per-input: {seen[name]} and {path} would both write to the sub-folder {name}",
                           "give inputs with different names (e.g. through symbolic links)")
        seen[name] = path
    return names


def adapt_each(config: AdaptConfig, console: Console | None = None) -> list[dict[str, Any]]:
    """Adapt a separate model on each input; the run records of this rank's inputs, in order."""
    console = console or Console(stderr=True)
    world = distributed.launched()
    if world.world_size > 1 and config.out is None:
        raise TTAError("--per-input under torchrun needs --out", "every rank must write into the same folder")
    names = input_names(list(config.inputs))
    out = config.out_dir()
    device = distributed.rank_device(config.device, world)
    mine = [(path, name) for index, (path, name) in enumerate(zip(config.inputs, names, strict=True))
            if index % world.world_size == world.rank]
    for _, name in mine:  # a full sub-folder fails now, not after adapting the inputs before it
        refuse_non_empty(out / name, config.overwrite)
    from tta_cli.run import adapt_local  # run imports the engine and the methods: only when adapting

    records = []
    for path, name in mine:
        if not config.quiet:
            console.print(f"[bold]input[/bold] {path} -> {out / name}"
                          + (f" (rank {world.rank} of {world.world_size})" if world.world_size > 1 else ""))
        records.append(adapt_local(replace(config, inputs=[path], out=out / name, device=device), console))
    return records
