"""`bnexp report --html FILE`: one self-contained page (figures as data: URIs, no
script, nothing fetched) with the verdict, the groups, the curves with seed bands,
the factorial view and each group's config; read back by a real headless
Chromium where one is installed."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bnexp.schema import compose
from bnexp.train import train
from tests.conftest import TINY, run_inprocess
from tests.test_report_stats import grid_2x3, write_run

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """norm.placement=pre,none x seed=0,1 of the suite's tiny MLP, as `bnexp sweep` lays them out."""
    root = tmp_path_factory.mktemp("html") / "sw"
    with contextlib.redirect_stdout(io.StringIO()):
        for num, (placement, seed) in enumerate((p, s) for p in ("pre", "none") for s in (0, 1)):
            overrides = [f"norm.placement={placement}", f"seed={seed}"]
            cfg = compose([*TINY, *overrides, "train.target_acc=0.3"])
            run_dir = root / ",".join(overrides)
            (run_dir / ".hydra").mkdir(parents=True)
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
            OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), run_dir / ".hydra" / "hydra.yaml")
            train(cfg, run_dir, extra_record={"overrides": overrides}, summary=False)
    return root


class Page(HTMLParser):
    """The page's text (what a reader sees), its headings, images and every URL it would load."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.headings, self.images, self.urls, self.scripts = [], [], [], [], 0
        self._heading = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v and not v.startswith("data:")]

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def write_page(root: Path, out: Path, *args: str):
    r = run_inprocess(["report", str(root), "--html", str(out), *args], Path.cwd())
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.slow  # three figures of real curves
def test_html_page_is_one_self_contained_file_with_every_section(sweep, tmp_path):
    r = write_page(sweep, tmp_path / "report.html")
    assert f"html: {tmp_path / 'report.html'}" in r.stdout
    page = Page((tmp_path / "report.html").read_text())
    assert page.urls == [] and page.scripts == 0  # nothing fetched, nothing run
    assert page.headings[:4] == [f"bnexp report: {sweep}", "Verdict", "verdict: each group against the baseline "
                                 "norm.placement=none (no normalization; --baseline KEY=VALUE chooses another)", "Groups"]
    assert {"Curves", "Loss", "Accuracy", "Gradient norm", "Each group's config"} <= set(page.headings)
    svgs = [base64.b64decode(img["src"].removeprefix("data:image/svg+xml;base64,")).decode() for img in page.images]
    assert len(svgs) == 3 and all(img["src"].startswith("data:image/svg+xml;base64,") for img in page.images)
    assert all("<svg" in svg and "<path" in svg for svg in svgs)
    words = page.words
    for expected in ("↑ val/acc", "↓ train/loss", "steps to val/acc ≥ 0.3", "seeds needed", "p (Holm)",
                     "norm.placement=pre", "norm.placement=none", str(sweep / "norm.placement=pre,seed=1")):
        assert expected in words, expected
    assert "not distinguishable at n = 2" in words or "better" in words or "worse" in words


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A 2x3 grid of runs with 4 seeds a cell (metrics.json only: no curves)."""
    root, num = tmp_path_factory.mktemp("grid") / "g", 0
    for (a, b), values in grid_2x3(0.6).items():
        for seed, v in enumerate(values):
            write_run(root, f"{a},{b},seed={seed}", {"model.act": a, "optim.sched": b},
                      {"val/acc": v, "test/acc": v, "train/loss": 2 - v}, seed, num)
            num += 1
    return root


def test_html_page_of_a_factorial_grid_shows_main_effects_and_interaction_plots(grid, tmp_path):
    write_page(grid, tmp_path / "grid.html")
    page = Page((tmp_path / "grid.html").read_text())
    assert {"Main effects and interactions", "Interaction plots"} <= set(page.headings)
    assert "model.act × optim.sched" in page.words and "No curves: these runs have no readable TensorBoard event files." in page.words
    assert len(page.images) == 1 and page.urls == []


def test_html_never_replaces_a_file_unless_told_and_refuses_names_that_are_no_page(grid, tmp_path):
    sweep = grid
    target = tmp_path / "report.html"
    target.write_text("an earlier page")
    r = run_inprocess(["report", str(sweep), "--html", str(target)], Path.cwd())
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: --html {target} exists; choose another name, or --overwrite to replace it\n"
    assert target.read_text() == "an earlier page"
    bad = run_inprocess(["report", str(sweep), "--html", str(tmp_path / "report.txt")], Path.cwd())
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'.txt' is no web page; allowed: a name ending in .html" in bad.stderr
    write_page(sweep, tmp_path / "noext")
    assert (tmp_path / "noext.html").read_text().startswith("<!DOCTYPE html>")
    write_page(sweep, target, "--overwrite")
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext.html", "report.html"]  # no temp file left beside them


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # two Chromium starts
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")
def test_html_page_renders_in_headless_chromium_with_its_figures(sweep, tmp_path):
    import matplotlib.image
    import numpy as np

    write_page(sweep, tmp_path / "report.html")
    url = (tmp_path / "report.html").as_uri()
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr
    page = Page(dom.stdout)
    for heading in ("Verdict", "Groups", "Curves", "Loss", "Accuracy", "Gradient norm", "Each group's config"):
        assert heading in page.headings
    assert "norm.placement=pre" in page.words and "seeds needed" in page.words and len(page.images) == 3
    shot = chromium("--window-size=1400,2600", f"--screenshot={tmp_path / 'shot.png'}", url, profile=tmp_path / "profile")
    assert shot.returncode == 0, shot.stderr
    pixels = (matplotlib.image.imread(tmp_path / "shot.png")[..., :3] * 255).round()
    # The curves' colours (matplotlib's first two: the groups), which nothing else on the page uses.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - rgb).max(axis=-1) < 8).sum() > 200, rgb
