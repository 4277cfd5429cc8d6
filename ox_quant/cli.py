"""The ``ox-quant`` command line. The CLI owns all output; the library prints nothing.

Each subcommand lives in its own ``ox_quant/commands/<name>.py`` module and is
registered in ``COMMANDS`` below.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ox_quant import __version__
from ox_quant.errors import OxQuantError

# name -> "module:attribute" of a click command, imported lazily so that
# `ox-quant convert` does not pay for torch or matplotlib imports.
COMMANDS: dict[str, str] = {
    "convert": "ox_quant.commands.convert:convert",
    "inspect": "ox_quant.commands.inspect:inspect_cmd",
    "demo": "ox_quant.commands.demo:demo_cmd",
    "export": "ox_quant.commands.export:export_cmd",
    "verify": "ox_quant.commands.verify:verify_cmd",
    "build-ops": "ox_quant.commands.build_ops:build_ops_cmd",
    "eval": "ox_quant.commands.eval:eval_cmd",
    "study": "ox_quant.commands.study:study_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ox-quant")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Quantize ONNX model weights for ONNX Runtime and measure what it costs."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 1."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if not debug:  # libraries' log records must not reach stderr through logging's last resort
        root = logging.getLogger()
        if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
            root.addHandler(logging.NullHandler())
    try:
        cli.main(args=args, prog_name="ox-quant", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("ox-quant: interrupted", err=True)
            sys.exit(130)
        click.echo("ox-quant: aborted", err=True)
        sys.exit(1)
    except click.exceptions.ClickException as exc:  # usage errors: click's own exit code (2)
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except OxQuantError as exc:
        if debug:
            raise
        click.echo(f"ox-quant: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("ox-quant: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("ox-quant: error: out of memory", err=True)
        sys.exit(1)
    except Exception as exc:  # last resort: a bug in ox-quant, still reported on one line
        if debug:
            raise
        from ox_quant.errors import one_line
        from ox_quant.ir.modelio import root_cause

        click.echo(f"ox-quant: internal error: {one_line(root_cause(exc))} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
