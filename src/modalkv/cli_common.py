"""What the command lines share (`modalkv.cli`, `modalkv.bench_cli` and `modalkv.eval.cli`): the stderr console, the
parsing of budgets and method parameters, and the error exit. Of modalkv it imports only the press registry (whose
syntax for parameter values it shares), so every command line can build on it."""

from __future__ import annotations

import shlex
import sys

import typer
from rich.console import Console

from modalkv.presses import parse_value

console = Console(stderr=True)


def parse_budget(text: str) -> float | int:
    """'0.2' -> 0.2, '512' -> 512; the press validates the range."""
    try:
        number = float(text)
    except ValueError:
        raise typer.BadParameter(f"budget must be a number, got {text!r}") from None
    return int(number) if number > 1 and number.is_integer() else number


def parse_params(items: list[str] | None) -> dict[str, bool | int | float | str]:
    """['kernel_size=7', 'pooling=max', 'evict_every=0'] -> {'kernel_size': 7, 'pooling': 'max', ...}."""
    params: dict[str, bool | int | float | str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"method parameters are KEY=VALUE, got {item!r}")
        params[key] = parse_value(value)
    return params


def command_line(name: str) -> str:
    """This process's `modalkv <name> ...` command, quoted for a shell (e.g. methods with parameters in parentheses),
    for the files a run writes."""
    args = sys.argv[2:] if sys.argv[1:2] == [name] else sys.argv[1:]
    return f"modalkv {name} " + shlex.join(args)


def fail(error: Exception) -> typer.Exit:
    """Prints `error` on stderr; the exit (code 2) to raise from it."""
    console.print(f"[red]error:[/red] {error}")
    return typer.Exit(code=2)
