"""The Typer app and the glue every command shares."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from imagefarm.errors import ImagefarmError

app = typer.Typer(
    name="imagefarm",
    help=(
        "Prebuild OpenHands agent-server images for R2E-Gym bases and serve them.\n\n"
        "Typical flow: `imagefarm payload build`, `imagefarm derive BASE --to REGISTRY/PREFIX`, "
        "`imagefarm prebuild --dataset ...`, `imagefarm lookup BASE`, `imagefarm runtime serve`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn ``ImagefarmError`` into one red line and exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImagefarmError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def option(config: type, name: str, *decls: str, **kw: Any) -> Any:
    """A Typer option for field ``name`` of the config dataclass ``config``: its default and
    help come from the field (``metadata={"help": ...}``), so each default is written once,
    in the config, and the config's ``__post_init__`` is the one place a value is checked."""
    import dataclasses

    f = next(f for f in dataclasses.fields(config) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else None
    kw.setdefault("help", f.metadata.get("help"))
    return typer.Option(default, *decls, **kw)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def main() -> None:
    app()
