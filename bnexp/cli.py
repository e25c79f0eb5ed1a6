"""The ``bnexp`` command line. Each command is a typed function whose docstring is its --help.

Heavy imports (torch, hydra, tensorboard, matplotlib) happen inside the
commands that need them, so ``bnexp --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="bnexp: batch-normalization experiments from Hydra configs, logged to TensorBoard.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Overrides and Hydra flags (--config-dir, --cfg job, ...) pass through untouched.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _hydra_error_line(e: BaseException) -> str:
    """One line from Hydra's and OmegaConf's exceptions, naming the key and the allowed values."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    text = str(e).strip()
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "Available options" in text:
        group = text.split("Could not find '", 1)[-1].split("/", 1)[0]
        lines = text.split("Available options in", 1)[1].splitlines()[1:]
        options = []
        for line in lines:
            if not line.startswith("\t") or not line.strip():
                break
            if not line.strip().startswith("base_"):  # the schema nodes of bnexp.config
                options.append(line.strip())
        return f"{group}={e.missing_cfg_file.split('/')[-1]} is not an option of group '{group}'; allowed: {', '.join(options)}"
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        msg = str(cause).splitlines()[0]
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and text.startswith("Could not override"):
            return f"unknown key '{key}'; `bnexp show` lists the keys, `+{key}=...` adds a new one"
        return f"{key}: {msg}" if key else msg
    if isinstance(e, OmegaConfBaseException):
        key = getattr(e, "full_key", None) or ""
        return f"{key}: {text.splitlines()[0]}" if key else text.splitlines()[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _sigterm_interrupts() -> None:
    """SIGTERM (a scheduler's preemption notice, ``kill``) stops bnexp like Ctrl-C:
    the training loop finishes its step and checkpoints; elsewhere it unwinds
    through the same ``finally`` blocks, so the run's status is written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


def _interrupted(e: KeyboardInterrupt, again: str) -> typer.Exit:
    from bnexp.train import RunInterrupted

    if isinstance(e, RunInterrupted):
        typer.echo(f"interrupted: {e}; {again}", err=True)
    else:
        typer.echo(f"interrupted; {again}", err=True)
    return typer.Exit(EXIT_INTERRUPTED)


def _run_hydra(argv: list[str]) -> list[dict]:
    """Run Hydra with ``argv``; map errors to exit codes. Returns the in-process job results."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bnexp import hydra_app
    from bnexp.config import ConfigError

    hydra_app.RESULTS.clear()
    _sigterm_interrupts()
    try:
        hydra_app.hydra_main(argv)
    except (ConfigError, hydra_app.RejectedConfig) as e:
        hydra_app.undo_run_dir()
        raise fail(str(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise fail(_hydra_error_line(e)) from None
    except KeyboardInterrupt as e:
        if hydra_app.SWEEP_DIRS:
            again = f"rerun the same sweep with hydra.sweep.dir={hydra_app.SWEEP_DIRS[-1]} to continue it"
        else:
            again = "`bnexp resume RUN_DIR` continues a run from its checkpoint"
        raise _interrupted(e, again) from None
    except SystemExit as e:  # argparse inside Hydra: bad flag, or --help
        raise typer.Exit(e.code if isinstance(e.code, int) else EXIT_USAGE) from None
    return list(hydra_app.RESULTS)


@app.command(context_settings=PASSTHROUGH)
def train(ctx: typer.Context) -> None:
    """Train one run. Arguments are Hydra overrides (key=value, group=option, +key=value, ~key) and Hydra flags.

    Example: bnexp train model=cnn norm=group norm.placement=post optim.lr=0.05 train.steps=2000
    """
    results = _run_hydra(list(ctx.args))
    for r in results:
        if r.get("status") == "failed":
            raise fail(f"run failed: {r.get('error')} (see {r.get('run_dir')})", EXIT_FAILED)


@app.command(context_settings=PASSTHROUGH)
def sweep(ctx: typer.Context) -> None:
    """Run a Hydra multirun: comma lists (a=x,y), range(), glob(), any sweeper/launcher plugin.

    Example: bnexp sweep norm.placement=pre,post,none seed=0,1,2 train.steps=200
    """
    results = _run_hydra(["--multirun", *ctx.args])
    failed = [r for r in results if r.get("status") == "failed"]
    if failed:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="the run directory (holds .hydra/, metrics.json and checkpoint.pt)")) -> None:
    """Continue an interrupted or killed run from its checkpoint.pt, into the same directory.

    The result is the one an uninterrupted run gives: bit-identical on CPU with
    train.deterministic=true; TensorBoard curves continue without duplicated
    steps. Completed or diverged runs, runs a live process is training, and
    directories without a readable checkpoint are refused (exit 2, nothing touched).
    """
    import logging
    import traceback

    from bnexp.config import ConfigError
    from bnexp.resume import resume as resume_run

    _sigterm_interrupts()
    try:
        record = resume_run(run_dir)
    except ConfigError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt as e:
        raise _interrupted(e, f"`bnexp resume {run_dir}` continues it") from None
    except Exception as e:  # noqa: BLE001  the run is marked failed; the log has the traceback
        logging.getLogger("bnexp").error("run failed: %s\n%s", e, traceback.format_exc())
        raise fail(f"run failed: {type(e).__name__}: {e} (see {run_dir}/bnexp.log)", EXIT_FAILED) from None
    if record.get("status") == "failed":
        raise fail(f"run failed: {record.get('error')} (see {run_dir})", EXIT_FAILED)


@app.command(context_settings=PASSTHROUGH)
def show(ctx: typer.Context) -> None:
    """Print the composed config (like Hydra's --cfg job) and every config group's options."""
    from bnexp.config import group_options

    _run_hydra([*ctx.args, "--cfg", "job"])
    typer.echo("# config groups (choose with group=option):")
    for group, options in group_options().items():
        typer.echo(f"#   {group}: {', '.join(options)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
