"""``bnexp reproduce RUN_DIR``: train a run's saved config again and compare.

The saved ``.hydra/config.yaml`` is the composed config, so no Hydra
composition is needed: it is merged onto the typed schema (for enums and
types) and handed to :func:`bnexp.train.train` directly. The new run goes to
``runs/reproduce/<timestamp>/<RUN_DIR's name>`` (outside the original sweep,
so a report on that sweep does not count it as one more seed) and records
``reproduce_of`` in its metrics.json.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnexp.config import Config, ConfigError, validate
from bnexp.runs import CONFIG, read_run


def load_saved_config(run_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    if not (run_dir / CONFIG).is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a run directory (no {CONFIG}); `bnexp runs` lists run directories")
    def one_line(e: Exception) -> str:
        return " ".join(str(e).split("\n")[0].split())

    try:
        # Keys a run added with Hydra's `+key=value` are part of its saved config:
        # accept them here (types of known keys are still checked), then close
        # the config again so that a mistyped override below is rejected.
        schema = OmegaConf.structured(Config)
        OmegaConf.set_struct(schema, False)
        cfg = OmegaConf.merge(schema, OmegaConf.load(run_dir / CONFIG))
        OmegaConf.set_struct(cfg, True)
    except Exception as e:  # noqa: BLE001  OmegaConf's validation and YAML errors
        raise ConfigError(getattr(e, "full_key", None) or str(run_dir / CONFIG), f"saved config does not fit the schema: {one_line(e)}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(getattr(e, "full_key", None) or " ".join(overrides or []), one_line(e)) from None
    validate(cfg)
    return cfg


def default_out_dir(run_dir: Path) -> Path:
    return Path("runs") / "reproduce" / time.strftime("%Y-%m-%d_%H-%M-%S") / run_dir.resolve().name


def reproduce(run_dir: Path, out_dir: Path | None = None, overrides: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train ``run_dir``'s config into a new run dir; returns (new dir, its metrics.json record).

    A config that fails while setting up (e.g. a batch larger than the data)
    leaves no new directory behind: the same RunDirGuard as `bnexp train` undoes it."""
    from bnexp.hydra_app import RunDirGuard
    from bnexp.io import atomic_write
    from bnexp.resume import log_to
    from bnexp.runtime import recorded_threads
    from bnexp.train import train

    cfg = load_saved_config(run_dir, overrides)
    out = out_dir or default_out_dir(run_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; allowed: a new directory")
    guard = RunDirGuard(out, "bnexp")
    try:
        (out / ".hydra").mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            if (run_dir / ".hydra" / name).exists():
                shutil.copy2(run_dir / ".hydra" / name, out / ".hydra" / name)
        if overrides:  # the config that actually ran, and how it came to differ
            saved = OmegaConf.load(out / ".hydra" / "overrides.yaml") if (out / ".hydra" / "overrides.yaml").exists() else []
            atomic_write(out / ".hydra" / "config.yaml", lambda f: OmegaConf.save(cfg, f))
            atomic_write(out / ".hydra" / "overrides.yaml", lambda f: OmegaConf.save(OmegaConf.create([*saved, *overrides]), f))
        log_to(out)
        original = read_run(run_dir)
        with recorded_threads(cfg, original.metrics):  # results depend on the thread count
            record = train(cfg, out, extra_record={"overrides": original.overrides + list(overrides or []), "reproduce_of": str(run_dir.resolve())})
    except ConfigError:
        guard.undo()
        raise
    return out, record


def differences(original: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any, float | None]]:
    """(metric, original, reproduced, difference) for status, steps and every final value
    except timing (time/*), which no two runs share."""
    rows: list[tuple[str, Any, Any, float | None]] = [
        ("status", original.get("status"), new.get("status"), None),
        ("steps", original.get("steps"), new.get("steps"), None),
    ]
    a, b = original.get("final") or {}, new.get("final") or {}
    for tag in sorted(set(a) | set(b), key=lambda t: (t.split("/")[0] not in ("train", "val", "test"), t)):
        if tag.startswith("time/"):
            continue
        x, y = a.get(tag), b.get(tag)
        diff = y - x if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None
        rows.append((tag, x, y, diff))
    if original.get("steps_to_target") is not None or new.get("steps_to_target") is not None:
        rows.append(("steps to target", original.get("steps_to_target"), new.get("steps_to_target"), None))
    return rows


def identical(rows: list[tuple[str, Any, Any, float | None]]) -> bool:
    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return x == y

    return all(same(x, y) for _, x, y, _ in rows)


def differences_table(rows: list[tuple[str, Any, Any, float | None]], title: str):
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    for name, justify in (("metric", "left"), ("original", "right"), ("reproduced", "right"), ("difference", "right")):
        table.add_column(name, justify=justify)
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    hidden = 0
    for tag, x, y, diff in rows:
        headline = "/" not in tag or tag.split("/")[0] in ("train", "val", "test")
        if not headline and x == y:
            hidden += 1  # probes and norms: listed only when they differ
            continue
        mark = "" if x == y else "[yellow]"
        same = "0" if isinstance(x, (int, float)) else "same"
        table.add_row(tag, fmt(x), fmt(y), mark + (same if x == y else (f"{diff:+.3g}" if diff is not None else "differs")))
    if hidden:
        table.caption = f"identical, not listed: {hidden} more (act/*, grad_norm/*, weight_norm/*, optim/*)"
    return table
