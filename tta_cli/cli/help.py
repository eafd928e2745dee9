"""What ``--help`` shows besides the options: each command's examples, and a command class that
prints plain metavars and flowing paragraphs.

Typer (0.29) prints its internal type names where no metavar replaces them: ``<bool>`` next to
every flag (``--help`` too) and ``<list[Path]>`` next to an argument, even one that names a
metavar; and ``{NAME}`` for a required argument on the usage line. :class:`Command` shows an
argument's metavar alone (``NAME`` on the usage line, ``[NAME]`` when optional) and nothing beside a flag, files
``--help`` in the command's last option panel, and joins each paragraph of the docstring into
one line (typer's rich mode keeps the line breaks of every paragraph but the first).
"""

from __future__ import annotations

import inspect
from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "tta": [
        ("Adapt on the bundled sample (no network needed)",
         "tta adapt sample_data/stream --labels sample_data/stream/labels.csv \\\n"
         "        --model local-dir:sample_data/model --out runs/sample"),
        ("Look at the run", "tta report runs/sample"),
        ("The options of a command", "tta adapt --help"),
    ],
    "adapt": [
        ("Adapt on the bundled sample, with labels for live accuracy",
         "tta adapt sample_data/stream --labels sample_data/stream/labels.csv \\\n"
         "        --model local-dir:sample_data/model --out runs/sample"),
        ("A Hugging Face model on a folder of photos, SAR, images filed by class",
         "tta adapt ./images --model vit_base --method sar --out runs/fog \\\n"
         "        --export-folder runs/fog-sorted"),
        ("Continue a stopped run", "tta adapt --resume runs/fog"),
        ("One model on 4 GPUs (docs/DISTRIBUTED.md)",
         "torchrun --nproc-per-node 4 --no-python \\\n        tta adapt ./images -m resnet50 --method sar"),
    ],
    "predict": [
        ("Predict with the model a run exported, and file the images by class",
         "tta predict sample_data/stream --model local-dir:runs/sample/model \\\n"
         "        --out runs/labels --export-folder runs/sorted"),
    ],
    "methods": [("All methods and their --set hyperparameters", "tta methods"),
                ("The same as JSON", "tta methods --json")],
    "models": [("The model aliases", "tta models")],
    "report": [("Charts and changed images of a run", "tta report runs/sample")],
    "corrupt": [("ImageNet-C's 15 corruptions at severity 5, on 224 px crops",
                 "tta corrupt ./val ./val-c --corruption all --severity 5 --crop 224")],
    "bench": [("The SAR paper's wild settings (pip install \".[bench]\")",
               "tta bench --model resnet50_gn --data ./val-c \\\n"
               "        --methods source,norm,tent,eata,sar --settings mild,mixed,bs1,label-shift")],
}


def examples(command: str) -> str | None:
    """The ``--help`` epilog: an Examples block, one paragraph per example where typer keeps the
    line breaks inside a paragraph, else one paragraph per line (see :func:`_keeps_line_breaks`)."""
    pairs = EXAMPLES.get(command)
    if not pairs:
        return None
    blocks = [f"  {what}:\n    $ {line}" for what, line in pairs]
    if not _keeps_line_breaks():
        blocks = [line for block in blocks for line in block.splitlines()]
    return "\n\n".join(["[bold]Examples[/bold]", *blocks])


def _keeps_line_breaks() -> bool:
    """typer >= 0.26 prints an epilog's paragraphs apart and keeps the line breaks inside each;
    older typers join each paragraph's lines with spaces and the paragraphs with line breaks."""
    from typer import rich_utils

    fix = getattr(rich_utils, "_fix_linebreaks", None)
    return fix is not None and "\n" in fix(["a\nb"], "rich")


class Command(TyperCommand):
    """A typer command with plain metavars and flowing help paragraphs (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = flowing(self.help)
        for param in self.params:
            if _plain(param):
                param.display_type_rich = _no_type  # type: ignore[attr-defined]
            if isinstance(param, TyperArgument):
                if hasattr(param, "_usage_display_name"):
                    param._usage_display_name = _usage_name(param)  # type: ignore[method-assign]
                elif param.metavar is not None and param.nargs != 1:
                    param.metavar += "..."  # older typers: click's usage line, without the dots

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.display_type_rich = _no_type
            panels = [panel for param in self.params if (panel := getattr(param, "rich_help_panel", None))]
            if panels:
                option.rich_help_panel = panels[-1]
        return option


class Group(TyperGroup):
    """The root ``tta`` group: flags without a type beside them (``--version``, ``--help``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epilog = examples("tta")
        for param in self.params:
            if _plain(param):
                param.display_type_rich = _no_type  # type: ignore[attr-defined]

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.display_type_rich = _no_type
        return option


def flowing(text: str | None) -> str | None:
    """Each paragraph of a docstring on one line."""
    if not text:
        return text
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(text).split("\n\n"))


def _plain(param: Any) -> bool:
    """A flag (no value to name) or an argument with its own metavar."""
    return bool(getattr(param, "is_flag", False)) or (isinstance(param, TyperArgument) and param.metavar is not None)


def _usage_name(argument: TyperArgument) -> Any:
    """An argument on the usage line as click writes it: NAME, [NAME] when optional, ... when repeated
    (typer writes a required one as {NAME})."""
    name = argument.metavar or (argument.name or "").upper()
    name = name if argument.required else f"[{name}]"
    text = name + ("..." if argument.nargs != 1 else "")
    return lambda: text


def _no_type(ctx: object = None) -> None:
    return None
