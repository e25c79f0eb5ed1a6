"""The ``bnexp`` command line. Each command is a typed function whose docstring is its --help.

Heavy imports (torch, hydra, tensorboard, matplotlib) happen inside the
commands that need them, so ``bnexp --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, List, NoReturn, Optional

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


def _follower() -> bool:
    """A rank other than 0 of a data-parallel run (torchrun): rank 0 says everything once."""
    return os.environ.get("RANK", "0") != "0"


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    if not _follower():
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
            from bnexp.schema import unknown_key_hint

            return f"unknown key '{key}'; {unknown_key_hint(key)}"
        return f"{key}: {msg}" if key else msg
    if isinstance(e, OmegaConfBaseException):
        key = getattr(e, "full_key", None) or ""
        return f"{key}: {text.splitlines()[0]}" if key else text.splitlines()[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _os_error_line(e: OSError) -> str:
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(e.filename).parent if e.filename else "the disk"
        return str(e) if e.strerror and e.strerror.startswith("no space left") else f"no space left on {where}"
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)


def _sigterm_interrupts() -> None:
    """SIGTERM (a scheduler's preemption notice, ``kill``) stops bnexp like Ctrl-C:
    the training loop finishes its step and checkpoints; elsewhere it unwinds
    through the same ``finally`` blocks, so the run's status is written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # SIGHUP: a closed terminal, unless nohup ignores it
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, handler)


def _interrupted(e: KeyboardInterrupt, again: str | None = None) -> typer.Exit:
    """Exit 130, saying how to go on: ``again``, or for a run what its run dir bears out."""
    from bnexp.rundir import RunInterrupted

    if _follower():
        return typer.Exit(EXIT_INTERRUPTED)
    if isinstance(e, RunInterrupted):
        world = os.environ.get("WORLD_SIZE", "1")
        resume = "bnexp resume" if world == "1" else f"torchrun --nproc_per_node={world} -m bnexp resume"
        if again is None:
            again = (f"`{resume} {e.run_dir}` continues it" if e.resumable
                     else "it stopped before it could save a checkpoint: nothing to resume; run the command again")
        typer.echo(f"interrupted: {e}; {again}", err=True)
    else:
        typer.echo(f"interrupted; {again or 'it stopped before training began: nothing to resume; run the command again'}", err=True)
    return typer.Exit(EXIT_INTERRUPTED)


def _run_hydra(argv: list[str], sweep: bool = False) -> None:
    """Run Hydra with ``argv``; map errors to exit codes.

    ``sweep``: KeyboardInterrupt passes through, for `bnexp sweep` to summarize what ran."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bnexp import hydra_app
    from bnexp.config import ConfigError, RankStopped

    _sigterm_interrupts()
    try:
        hydra_app.hydra_main(argv)
    except (ConfigError, hydra_app.RejectedConfig) as e:
        raise fail(str(e)) from None
    except RankStopped as e:  # a follower rank: rank 0 has said why
        raise typer.Exit(e.code) from None
    except hydra_app.RunFailed as e:
        raise fail(str(e), EXIT_FAILED) from None
    except (HydraException, OmegaConfBaseException) as e:  # before OSError: MissingConfigException is an IOError
        raise fail(_hydra_error_line(e)) from None
    except OSError as e:  # Hydra's own writes (.hydra/, its log) on a full or read-only disk
        hydra_app.take_back_pending()
        raise fail(_os_error_line(e), EXIT_FAILED) from None
    except KeyboardInterrupt as e:
        if sweep:
            raise
        hydra_app.take_back_pending()  # interrupted while Hydra wrote .hydra/, before the task began
        raise _interrupted(e) from None
    except SystemExit as e:  # argparse inside Hydra: bad flag, or --help
        raise typer.Exit(e.code if isinstance(e.code, int) else EXIT_USAGE) from None



@app.command(context_settings=PASSTHROUGH)
def train(ctx: typer.Context) -> None:
    """Train one run. Arguments are Hydra overrides (key=value, group=option, +key=value, ~key) and Hydra flags.

    Example: bnexp train model=cnn norm=group norm.placement=post optim.lr=0.05 train.steps=2000
    """
    _run_hydra(list(ctx.args))


@app.command(context_settings=PASSTHROUGH)
def sweep(ctx: typer.Context) -> None:
    """Run a Hydra multirun: comma lists (a=x,y), range(), glob(), any sweeper/launcher plugin.

    Example: bnexp sweep norm.placement=pre,post,none seed=0,1,2 train.steps=200

    Jobs go to runs/<experiment or "sweep">/<timestamp>/<overrides,seed=N>; a job
    that completed earlier with the same config in the same hydra.sweep.dir is
    skipped. Ends with a table of every job and the seed-aggregated comparison;
    exits 1 if a job failed. Ctrl-C stops the running job after its step (with
    a checkpoint), prints the summary of the jobs that ran and the command that
    continues the sweep, and exits 130; a second Ctrl-C stops at once.
    Parallel: hydra/launcher=joblib. Search: hydra/sweeper=optuna
    hydra.sweeper.direction=maximize (the objective is val/acc).
    """
    from bnexp import sweep as sweep_mod

    args = list(ctx.args)
    if set(args) & {"--cfg", "-c", "--info", "-i", "--hydra-help", "--shell-completion", "-sc"}:
        _run_hydra(args)  # Hydra's inspection flags exclude --multirun
        return
    before = len(sweep_mod.STARTED)
    refused_before = len(_refused())
    _sigterm_interrupts()
    try:
        with _signals_received() as received:
            _run_hydra(["--multirun", *args], sweep=True)
    except typer.Exit as e:
        if e.exit_code == EXIT_USAGE and len(sweep_mod.STARTED) > before:
            sweep_mod.STARTED[-1].remove_if_unused()
        raise
    except KeyboardInterrupt as e:
        if _follower():
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if len(sweep_mod.STARTED) == before:
            raise _interrupted(e, "no job had started") from None
        from bnexp.rundir import RunInterrupted

        # A run that stopped after its step absorbed any repeated SIGTERM; otherwise a
        # second signal means the first one's wind-down was cut short: stop at once.
        saved = isinstance(e, RunInterrupted) and e.step is not None
        _sweep_interrupted(e, sweep_mod.STARTED[-1], args, second=received() > 1 and not saved)
    if len(sweep_mod.STARTED) == before or _follower():  # rank 0 of a data-parallel sweep sums it up
        return
    try:
        jobs = sweep_mod.finish(sweep_mod.STARTED[-1])
    except KeyboardInterrupt as e:  # Ctrl-C during the summary of a finished sweep
        raise _interrupted(e, f"every job ended; `bnexp report {sweep_mod.STARTED[-1].dir} --tensorboard` "
                              "prints the summary and writes the sweep's dashboards") from None
    refused = _refused()[refused_before:]
    for run_dir, reason in refused:  # untouched, so the table shows what they held before
        typer.echo(f"not run: {run_dir.name}: {reason}", err=True)
    if refused or any(j.status in ("failed", "unreadable", "dead") for j in jobs):
        raise typer.Exit(EXIT_FAILED)


def _refused() -> list:
    from bnexp import hydra_app

    return hydra_app.REFUSED


@contextmanager
def _signals_received() -> Iterator:
    """Yields a function that counts the SIGINT/SIGTERM received so far, whichever
    handler took them: the training loop's own (the first signal stops the run
    after its step) or Python's (KeyboardInterrupt at once). Through the wakeup
    fd, where the C-level handler writes each signal's number: a non-blocking
    socket pair, which Windows accepts as well. Where no wakeup fd can be set
    (a thread other than the main one), every interruption counts as the first."""
    import socket

    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    try:
        old = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except ValueError:
        r.close()
        w.close()
        yield lambda: 1
        return
    seen = bytearray()
    is_open = [True]

    def received() -> int:
        while is_open[0]:
            try:
                chunk = r.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            seen.extend(chunk)
        return sum(b in (signal.SIGINT, signal.SIGTERM) for b in seen)

    try:
        yield received
    finally:
        signal.set_wakeup_fd(old)
        received()
        is_open[0] = False
        r.close()
        w.close()


def _sweep_interrupted(e: KeyboardInterrupt, start, args: list[str], second: bool) -> NoReturn:
    """After Ctrl-C: the summary and TensorBoard records of the jobs that ran, how to continue, exit 130.
    A second Ctrl-C (while the job winds down, or during the summary) skips what is left."""
    import shlex

    from bnexp import sweep as sweep_mod
    from bnexp.rundir import CHECKPOINT

    jobs = None
    try:
        if not second:
            jobs = sweep_mod.finish(start, interrupted=True)
    except KeyboardInterrupt:
        second = True
    typer.echo(f"interrupted: {e}" if str(e) else "interrupted", err=True)
    cwd = Path.cwd().resolve()
    where = start.dir.relative_to(cwd) if start.dir.is_relative_to(cwd) else start.dir
    if second:
        typer.echo(f"stopped at once by a second Ctrl-C, without the summary: `bnexp report {where} --tensorboard` "
                   "compares the jobs and writes the sweep's dashboards", err=True)
    again = shlex.join(["bnexp", "sweep", *(a for a in args if not a.startswith("hydra.sweep.dir=")), f"hydra.sweep.dir={where}"])
    # Said only as far as the run dirs bear it out: a job stopped at once (a second
    # Ctrl-C, or a joblib worker killed with its parent) may have no checkpoint yet.
    unfinished = [j for j in jobs or [] if j.status not in ("completed", "diverged", "skipped")]
    all_saved = jobs is not None and all((j.run.path / CHECKPOINT).is_file() for j in unfinished)
    resumes = "resumes interrupted ones from their last checkpoint" + ("" if all_saved else ", or starts them over without one")
    if start.replays_its_jobs:
        typer.echo(f"to continue (skips finished jobs, {resumes}): {again}", err=True)
    else:  # e.g. Optuna: a rerun samples new trials; only a trial of a config already run is skipped or resumed
        typer.echo(f"rerun into the same directory (skips jobs whose config finished there, {resumes}; "
                   f"the sweeper chooses its jobs anew): {again}", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="the run directory (holds .hydra/, metrics.json and checkpoint.pt)")) -> None:
    """Continue an interrupted or killed run from its checkpoint.pt, into the same directory.

    The result is the one an uninterrupted run gives: bit-identical on CPU with
    train.deterministic=true; TensorBoard curves continue without duplicated
    steps. Completed or diverged runs, runs a live process is training, and
    directories without a readable checkpoint are refused (exit 2, nothing touched).
    """
    from bnexp.rerun import resume as resume_run

    _train_outside_hydra(lambda: resume_run(run_dir), run_dir)


def _train_outside_hydra(call, run_dir: Path, again: str | None = None):
    """Run ``call()``, a training that bypasses Hydra (resume, reproduce), and map
    its outcome to exit codes the way `bnexp train` does: 2 bad input, 130
    interrupted (saying how to continue), 1 failed (the traceback goes to the log)."""
    import logging
    import traceback

    from bnexp.config import ConfigError, RankStopped

    _sigterm_interrupts()
    try:
        return call()
    except ConfigError as e:
        raise fail(str(e)) from None
    except RankStopped as e:
        raise typer.Exit(e.code) from None
    except KeyboardInterrupt as e:
        raise _interrupted(e, again) from None
    except Exception as e:  # noqa: BLE001  the run is marked failed; the log has the traceback
        from bnexp.hydra_app import one_line
        from bnexp.io import NoSpace

        if isinstance(e, NoSpace):  # nothing to debug, and the log is on the full disk too
            raise fail(str(e), EXIT_FAILED) from None
        logging.getLogger("bnexp").error("run failed: %s\n%s", e, traceback.format_exc())
        raise fail(f"run failed: {one_line(e)} (see {run_dir}/bnexp.log)", EXIT_FAILED) from None


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    markdown = "markdown"


class Interval(str, Enum):
    t = "t"
    bootstrap = "bootstrap"


class Correction(str, Enum):
    holm = "holm"
    bonferroni = "bonferroni"
    none = "none"


class Aggregate(str, Enum):
    mean = "mean"
    iqm = "iqm"


def _compared_runs(paths: list[Path] | None, by: list[str] | None, baseline: list[str] | None):
    """The runs under ``paths``, grouped, with the baseline chosen: what `report` and `seeds`
    compare. Returns (runs, usable runs, groups, baseline); bad input exits 2."""
    from bnexp import report as rep
    from bnexp.runs import find_runs

    paths = paths or [Path("runs")]
    for p in paths:
        if not p.exists():
            raise fail(f"{p} does not exist; allowed: run or sweep directories (default: runs/)")
    runs = find_runs(paths)
    usable = [r for r in runs if r.config is not None]
    if not usable:
        raise fail(f"no runs under {', '.join(map(str, paths))} (a run directory holds metrics.json and .hydra/config.yaml)")
    keys = {k for r in usable for k in r.config}
    for k in by or []:
        if k not in keys:
            raise fail(f"--by {k}: not a config key of these runs; keys that differ: {', '.join(rep.differing_keys(usable)) or 'none'}")
    groups = rep.group_runs(usable, by)
    try:
        base = rep.choose_baseline(groups, baseline)
    except rep.BaselineError as e:
        raise fail(str(e)) from None
    return runs, usable, groups, base


def _check_metrics(metric: list[str] | None, usable) -> None:
    from bnexp import report as rep

    known = rep.available_metrics(usable)
    for m in metric or []:
        if m not in known:
            raise fail(f"--metric {m}: no run has it; allowed: {', '.join(known)}")


@app.command()
def report(
    paths: List[Path] = typer.Argument(None, help="Run or sweep directories to search for runs (default: runs/)."),
    by: List[str] = typer.Option(None, "--by", help="Group by this config key (repeatable); default: every key that differs except seed."),
    metric: List[str] = typer.Option(None, "--metric", "-m", help="Metric tag to show (repeatable); default: val/acc, test/acc, train/loss (val/loss, test/loss, train/loss for runs without accuracy); with --plot, probe tags get panels (X_min/X_max as a band)."),
    baseline: List[str] = typer.Option(None, "--baseline", help="KEY=VALUE of the group the others are compared with (repeatable); default: norm.placement=none where a group has it, else the first group."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    ci: Interval = typer.Option(Interval.t, "--ci", help="95% intervals: t (Student t; Welch's for differences) or bootstrap (scipy.stats.bootstrap, percentile, seeded; unreliable below 8 seeds)."),
    correct: Correction = typer.Option(Correction.holm, "--correct", help="Adjust each metric's p-values over its comparisons with the baseline: holm (step-down), bonferroni, or none."),
    aggregate: Aggregate = typer.Option(Aggregate.mean, "--aggregate", help="A group's centre: mean, or iqm (interquartile mean; bootstrap intervals, permutation-test p)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write learning curves with seed bands and act/* percentiles to this image (PNG unless the name ends in another format, e.g. .pdf, .svg), plus a panel per probe --metric (X_min/X_max: the min..max band)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write one self-contained HTML page: the verdicts, the groups, curves with seed bands, main effects, each group's config."),
    overwrite: bool = typer.Option(False, "--overwrite", "--force", help="Let --plot and --html replace an existing file (otherwise refused)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also (re)write the HParams config, custom-scalars layout and aggregate/ seed bands into the one sweep directory given."),
) -> None:
    """Compare runs: group by the config keys that differ (except seed); mean ± std (n) and 95% CI
    over seeds; each group against the baseline group: difference and its 95% CI, Welch's p, the
    p adjusted over the comparisons (Holm), Hedges' g, a verdict (better, worse, or not
    distinguishable at n seeds) and the seeds that would settle it; main effects of a factorial grid.

    Example: bnexp report runs/placement_ablation/2024-05-01_12-00-00 --format markdown --html report.html
    """
    from bnexp import report as rep
    from bnexp.runs import headline

    if tensorboard and (len(paths or [Path("runs")]) != 1 or not (paths or [Path("runs")])[0].is_dir()):
        raise fail("--tensorboard writes into one sweep directory; give exactly one")
    for flag, target, check in (("--plot", plot, rep.check_plot_file), ("--html", html, _check_html_file)):
        if target is not None:
            try:
                check(target, overwrite)  # before anything is printed or drawn
            except rep.PlotError as e:
                raise fail(f"{flag} {e}") from None
    runs, usable, groups, base = _compared_runs(paths, by, baseline)
    paths = paths or [Path("runs")]
    _check_metrics(metric, usable)
    unreadable = [r for r in runs if r.config is None or r.metrics is None]
    # Defaults no run has yet (no test/acc while every run is still running) are left out.
    metrics = list(metric) if metric else [m for m in headline(usable) if m in rep.available_metrics(usable)]
    options = rep.Options(aggregate=aggregate.value, ci=ci.value, correct=correct.value)
    result = rep.Report.build(groups, metrics, base, options, unreadable)
    written = _report_files(result, plot, html, overwrite, metric or [], paths)  # before printing: a file that cannot be written is one line, exit 2
    console = rep.console()
    notes = [f"unreadable: {r.path}: {r.problem}" for r in unreadable] + [line for line in [rep.duplicates_text(groups)] if line]
    if format == Format.table:
        counted = sum(len(g.runs) for g in groups)
        console.print(", ".join(map(str, paths)), soft_wrap=True, highlight=False, style="bold")
        rep.print_report(console, result, groups_title=f"{counted} runs in {len(groups)} groups{rep.by_text(result)} "
                                                       f"({options.centre} ± std over seeds)")
        for line in notes:
            console.print(line, style="yellow", highlight=False, soft_wrap=True)
    else:
        out = {Format.csv: lambda: rep.to_csv(result), Format.json: lambda: rep.to_json(result),
               Format.markdown: lambda: rep.to_markdown(result)}[format]()
        typer.echo(out.rstrip("\n"))
        if format != Format.json:
            for line in notes:
                typer.echo(line, err=True)
    for line in written:
        typer.echo(line, err=format != Format.table)
    if tensorboard:
        from bnexp.sweep import write_tensorboard_extras

        written = write_tensorboard_extras(paths[0], runs)  # the runs this report read already
        typer.echo(f"tensorboard: HParams over {', '.join(written.get('hparams', []))}; aggregate/ runs for {len(written.get('groups', []))} groups", err=format != Format.table)


def _check_html_file(path: Path, overwrite: bool) -> Path:
    from bnexp.report_html import check_page_file

    return check_page_file(path, overwrite)


def _report_files(result, plot: Path | None, html: Path | None, overwrite: bool, probe_metrics: list[str],
                  paths: list[Path]) -> list[str]:
    """`bnexp report --plot` and `--html`, written before the report is printed (so a
    place that cannot be written is one line and exit 2, not a traceback after the
    tables); returns the lines that name what was written."""
    from bnexp import report as rep

    said: list[str] = []
    for flag, target in (("--plot", plot), ("--html", html)):
        if target is None:
            continue
        try:
            if flag == "--plot":
                written = rep.plot(result.groups, target, overwrite, probe_metrics)
                said.append(f"plot: {written}" + (f" (PNG: {target} has no extension)" if written != target else ""))
            else:
                from bnexp.report_html import write_page

                said.append(f"html: {write_page(result, target, overwrite, title=', '.join(map(str, paths)))}")
        except rep.PlotError as e:
            raise fail(f"{flag} {e}") from None
        except ValueError as e:
            raise fail(f"{flag}: {e}") from None
        except OSError as e:
            raise fail(f"{flag} {target}: cannot write there ({e.strerror or e}); allowed: a file in a directory you can write to") from None
    return said


@app.command()
def seeds(
    paths: List[Path] = typer.Argument(None, help="Run or sweep directories (default: runs/)."),
    effect: Optional[float] = typer.Option(None, "--effect", help="The difference to detect, in the metric's units (0.01 = one point of accuracy); default: each group's observed difference from the baseline."),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="The metric; default: val/acc (val/loss for runs without accuracy)."),
    power: float = typer.Option(0.8, "--power", help="The probability of detecting the difference, in (0, 1)."),
    alpha: float = typer.Option(0.05, "--alpha", help="The test's significance level, in (0, 1); divide by the number of comparisons for a Bonferroni-safe count."),
    by: List[str] = typer.Option(None, "--by", help="Group by this config key (repeatable); default: every key that differs except seed."),
    baseline: List[str] = typer.Option(None, "--baseline", help="KEY=VALUE of the baseline group (repeatable); default as in bnexp report."),
    format: Format = typer.Option(Format.table, "--format", "-f", help="table or json."),
) -> None:
    """Seeds per group needed to detect a difference of --effect between each group and the
    baseline: a two-sided two-sample t-test at --alpha with --power, from the two groups'
    pooled standard deviation (noncentral t).

    Example: bnexp seeds runs/placement_ablation/2024-05-01_12-00-00 --effect 0.01 --metric test/acc
    """
    from bnexp import report as rep
    from bnexp.runs import headline

    for name, value in (("--power", power), ("--alpha", alpha)):
        if not 0 < value < 1:
            raise fail(f"{name} {value}: allowed: a probability strictly between 0 and 1")
    if effect is not None and not (effect != 0 and abs(effect) < float("inf")):
        raise fail(f"--effect {effect}: allowed: a nonzero finite difference in the metric's units")
    if format not in (Format.table, Format.json):
        raise fail(f"--format {format.value}: allowed: table, json")
    _, usable, groups, base = _compared_runs(paths, by, baseline)
    _check_metrics([metric] if metric else None, usable)
    metric = metric or headline(usable)[0]
    options = rep.Options(power=power, alpha=alpha)
    result = rep.Report.build(groups, [metric], base, options)
    rows = rep.seed_counts(result, metric, effect)
    if format == Format.json:
        import json

        typer.echo(json.dumps({"metric": metric, "effect": effect, "power": power, "alpha": alpha, "groups": rows}, indent=2))
        return
    rep.print_grid(rep.console(), rep.seeds_grid(result, metric, effect, rows))


@app.command(context_settings=PASSTHROUGH)
def reproduce(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="The run directory whose .hydra/config.yaml is trained again."),
    out: Optional[Path] = typer.Option(None, "--out", help="New run directory (default: runs/reproduce/<timestamp>/<RUN_DIR's name>)."),
) -> None:
    """Train a run's saved config again into a new run dir and print the metric differences.

    Extra key=value arguments change the saved config (e.g. train.device=cpu).
    With train.deterministic=true on CPU the metrics are identical.
    """

    from bnexp import rerun as rp
    from bnexp.rundir import read_record

    overrides = list(ctx.args)
    if any("=" not in o or o.startswith(("+", "~", "-")) for o in overrides):
        raise fail(f"reproduce takes key=value changes to the saved config; got {' '.join(overrides)}")
    original = read_record(run_dir) or {}
    out = out or rp.default_out_dir(run_dir)
    result = _train_outside_hydra(lambda: rp.reproduce(run_dir, out, overrides), out)
    if _follower():  # it trained rank 0's copy; rank 0 compares
        return
    new_dir, record = result
    rows = rp.differences(original, record)
    from bnexp.report import console as make_console, print_titled

    console = make_console()
    print_titled(console, f"{run_dir} -> {new_dir}", rp.differences_table(rows, None))
    verdict = "identical: every metric matches exactly" if rp.identical(rows) else "differs (see the difference column)"
    caveat = None if rp.identical(rows) else rp.caveat(original)
    if caveat:
        verdict += f"; trained alone, {caveat}"
    console.print(f"{verdict}; timing (time/*) is not compared", highlight=False)


@app.command("runs")
def list_runs(path: Path = typer.Argument(Path("runs"), help="Where to look (default: runs/).")) -> None:
    """List runs with status (a running run whose heartbeat stopped shows as dead), overrides and headline metrics."""
    from bnexp.report import console
    from bnexp.report import print_titled
    from bnexp.runs import find_runs, runs_tables

    if not path.exists():
        raise fail(f"{path} does not exist; allowed: a directory of runs (default: runs/)")
    runs = find_runs([path], with_config=False)  # the table shows metrics and overrides only
    if not runs:
        typer.echo(f"no runs under {path}")
        return
    out = console()
    for heading, table in runs_tables(runs):
        print_titled(out, heading, table)


@app.command(context_settings=PASSTHROUGH)
def tb(
    ctx: typer.Context,
    logdir: Path = typer.Argument(Path("runs"), help="Directory of runs (default: runs/); a sweep dir shows its HParams and seed bands best."),
    port: int = typer.Option(6006, "--port", help="Port; 0 picks a free one."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 for every interface."),
) -> None:
    """Start TensorBoard on runs/ (or LOGDIR). Other TensorBoard flags pass through (e.g. --reload_interval 5)."""
    import contextlib
    import io

    if not logdir.exists():
        raise fail(f"{logdir} does not exist; allowed: a directory of runs (default: runs/)")
    if not _has_event_files(logdir):
        raise fail(f"{logdir} holds no TensorBoard event files (events.out.tfevents.*); allowed: a run or sweep "
                   "directory, or a folder of them (default: runs/)")
    _check_bind(host, port)
    from tensorboard import program

    board = program.TensorBoard()
    said = io.StringIO()
    try:
        # TensorBoard's argparse prints its whole usage before the error line: keep only that line.
        with contextlib.redirect_stderr(said):
            board.configure(argv=["tensorboard", "--logdir", str(logdir), "--port", str(port), "--host", host, *ctx.args])
    except (SystemExit, ValueError) as e:
        lines = [line for line in said.getvalue().splitlines() if line.strip()]
        raise fail(lines[-1] if lines else f"tensorboard: {e}") from None
    raise typer.Exit(board.main() or 0)


def _check_bind(host: str, port: int) -> None:
    """``bnexp tb``'s address, tried before TensorBoard starts (which says a bad one
    with a traceback or its own exit 255): a port outside 0..65535, a host that is
    no address of this machine, a port in use are each one line and exit 2."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise fail(f"--port {port}: allowed: 1 to 65535, or 0 for a free one")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise fail(f"--host {host}: not an address or a name this machine resolves ({e.strerror if hasattr(e, 'strerror') else e}); "
                   "allowed: 127.0.0.1 (this machine only, the default), 0.0.0.0 (every interface), or this machine's name") from None
    if port == 0:
        return
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TensorBoard's server binds
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise fail(f"--port {port} is in use on {host} (another TensorBoard?); allowed: a free port, or --port 0 to "
                           "pick one") from None
            raise fail(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); allowed: an address of this "
                       "machine and a port you may bind, or --port 0") from None


def _has_event_files(logdir: Path) -> bool:
    for _, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents.") for f in files):
            return True
    return False


@app.command(context_settings=PASSTHROUGH)
def show(ctx: typer.Context) -> None:
    """Print the composed config (like Hydra's --cfg job) and every config group's options."""
    from bnexp.schema import group_options  # configs/ and the norms registered without a YAML file

    _run_hydra([*ctx.args, "--cfg", "job"])
    typer.echo("# config groups (choose with group=option):")
    for group, options in group_options().items():
        typer.echo(f"#   {group}: {', '.join(options)}")


def main() -> None:
    import logging

    # A log file that cannot be written (a full disk) must not print a traceback
    # per record: the run's own error says what happened.
    logging.raiseExceptions = False
    app()


if __name__ == "__main__":
    main()
