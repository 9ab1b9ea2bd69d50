"""The ``secateur`` command line. Argument parsing only: every command calls a public function.

Bad input (a missing path, an unknown method, a bad recipe) prints one line and exits with code 2;
an unexpected failure prints one line and exits with code 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SecateurError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make neural networks smaller and measurably faster.")
import_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints from other formats.")
app.add_typer(import_app, name="import")

out = Console()
err = Console(stderr=True)


def _emit(data: Any, as_json: bool, table: Any = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        out.print(table)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from . import __version__

        out.print(f"secateur {__version__}")
        raise typer.Exit()


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the compression methods: name, kind, whether they need data, paper."""
    from .api import methods

    rows = [{"name": m.name, "kind": m.kind, "needs_data": m.needs_data, "paper": m.paper,
             "config": m.config.__name__} for m in methods().values()]
    table = Table("method", "kind", "needs data", "config", "paper")
    for r in rows:
        table.add_row(r["name"], r["kind"], "yes" if r["needs_data"] else "no", r["config"], r["paper"])
    _emit(rows, as_json, table)


@app.command("explain")
def explain_cmd(method: str = typer.Argument(..., help="A method name, see `secateur methods`.")) -> None:
    """Print a method's fields, defaults and docs, and an example recipe."""
    from .api import get_method
    from .recipe import example_yaml

    spec = get_method(method)
    out.print(f"[bold]{spec.name}[/bold] ({spec.kind}; {'needs' if spec.needs_data else 'no'} calibration data)"
              f" — {spec.paper}")
    doc = (spec.config.__doc__ or "").strip()
    module_doc = (sys.modules[spec.config.__module__].__doc__ or "").strip()
    if module_doc:
        out.print(module_doc)
    elif doc:
        out.print(doc)
    table = Table("field", "type", "default", "valid", "doc")
    for f in spec.config.describe():
        valid = f"[{f['range'][0]}, {f['range'][1]}]" if f["range"] else (", ".join(map(str, f["choices"])) if f["choices"] else "")
        table.add_row(f["name"], f["type"], repr(f["default"]), valid, f["doc"])
    out.print(table)
    out.print("Example recipe:")
    out.print(example_yaml(spec), markup=False, highlight=False)


@import_app.command("llama2c")
def import_llama2c_cmd(model_bin: Path = typer.Argument(..., help="llama2.c checkpoint (.bin)"),
                       tokenizer_model: Path = typer.Argument(..., help="SentencePiece tokenizer (.model)"),
                       out_dir: Path = typer.Argument(..., help="Output Hugging Face model directory")) -> None:
    """Convert a llama2.c checkpoint into a Hugging Face Llama directory."""
    from .models.llama2c import import_llama2c

    path = import_llama2c(model_bin, tokenizer_model, out_dir)
    out.print(f"wrote {path}")


def main(argv: Optional[List[str]] = None) -> None:
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="secateur", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except SecateurError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            raise
        err.print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                  markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
