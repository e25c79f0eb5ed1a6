"""`bnexp report --plot` with probe metrics: a ``*_min`` / ``*_max`` pair is drawn
as a shaded min..max band (Santurkar et al. 2018, Fig. 4), other probe tags as
curves; the learning-curve panels stay as they were."""

from __future__ import annotations

import contextlib
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bnexp.report import draw_band, probe_panels  # noqa: E402
from bnexp.schema import compose  # noqa: E402
from bnexp.train import train  # noqa: E402
from tests.conftest import panel, run_inprocess, seed_mean_and_std  # noqa: E402

TINY = ["data=synthetic", "data.n_train=320", "data.n_test=64", "model.hidden=[8]", "train.steps=6", "train.log_every=2",
        "train.eval_every=3", "train.batch_size=32", "train.progress=false", "train.device=cpu",
        "probes.landscape.every=2", "probes.hessian.every=3", "probes.hessian.iterations=3", "probes.activations.every=0"]


@pytest.fixture(scope="module")
def probed_runs(tmp_path_factory):
    """BN vs none x 2 seeds with the landscape and Hessian probes, as `bnexp sweep` lays them out."""
    root = tmp_path_factory.mktemp("probed")
    with contextlib.redirect_stdout(io.StringIO()):
        for placement in ("pre", "none"):
            for seed in (0, 1):
                overrides = [f"norm.placement={placement}", f"seed={seed}"]
                cfg = compose([*TINY, *overrides])
                run_dir = root / ",".join(overrides)
                (run_dir / ".hydra").mkdir(parents=True)
                OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
                train(cfg, run_dir, extra_record={"overrides": overrides})
    return root


def test_band_and_curve_panels_for_the_probe_metrics_asked_for():
    asked = ["val/acc", "landscape/loss_min", "landscape/loss_max", "landscape/beta", "test/acc", "hessian/top_eig"]
    assert probe_panels(asked) == [("band", "landscape/loss"), ("curve", "landscape/beta"), ("curve", "hessian/top_eig")]


def test_a_band_is_shaded_between_the_seed_means_of_the_min_and_the_max_curves():
    curves = {"landscape/loss_min": [[(2, 1.0), (4, 0.5)], [(2, 3.0), (4, 1.5)]],
              "landscape/loss_max": [[(2, 5.0), (4, 2.0)], [(2, 7.0), (4, 4.0)]]}
    fig, ax = plt.subplots()
    draw_band(ax, curves, "landscape/loss", "tab:blue", "norm.placement=pre")
    (band,) = ax.collections
    xs, ys = band.get_paths()[0].vertices.T
    lower = {x: y for x, y in zip(xs, ys) if y < 2.5}
    upper = {x: y for x, y in zip(xs, ys) if y >= 2.5}
    assert lower[2] == 2.0 and lower[4] == 1.0 and upper[2] == 6.0 and upper[4] == 3.0
    assert ax.get_legend_handles_labels()[1] == ["norm.placement=pre (n=2)"]
    plt.close(fig)


@pytest.mark.slow
def test_report_plot_adds_a_band_panel_when_its_metric_is_asked_for(probed_runs, tmp_path, drawn_figures):
    plain = run_inprocess(["report", str(probed_runs), "--plot", str(tmp_path / "plain.png")], tmp_path)
    banded = run_inprocess(["report", str(probed_runs), "-m", "landscape/loss_max", "-m", "landscape/loss_min",
                            "-m", "hessian/top_eig", "--plot", str(tmp_path / "bands.png")], tmp_path)
    assert plain.returncode == 0 and banded.returncode == 0, banded.stdout + banded.stderr
    assert "landscape/loss_max" in banded.stdout and "hessian/top_eig" in banded.stdout  # the table's columns
    h0, w0, _ = matplotlib.image.imread(tmp_path / "plain.png").shape
    img = matplotlib.image.imread(tmp_path / "bands.png")[..., :3]
    h1, w1, _ = img.shape
    # 4 learning-curve panels in one row; the band and the curve make a second row of 2 of 4 panels.
    assert w1 == w0 and h1 > 1.7 * h0
    row2 = img[int(h1 * 0.55) : int(h1 * 0.85)]
    assert (row2[:, : w1 // 2] < 0.9).mean() > 0.01 and (row2[:, w1 // 2 + 20 :] < 0.9).mean() == 0
    # What is drawn: each group's band edges and curve are its seed means, read back from the event files.
    fig = drawn_figures[-1]
    band_ax, curve_ax = panel(fig, "landscape/loss: min..max band"), panel(fig, "hessian/top_eig")
    for placement in ("pre", "none"):
        runs = sorted(probed_runs.glob(f"norm.placement={placement},seed=*"))
        (band,) = [c for c in band_ax.collections if c.get_label() == f"norm.placement={placement} (n=2)"]
        ys = band.get_paths()[0].vertices[:, 1]
        for edge in ("landscape/loss_min", "landscape/loss_max"):
            _, mean, _ = seed_mean_and_std(runs, edge)
            assert all(np.isclose(ys, v, rtol=1e-6).any() for v in mean), (placement, edge)
        (line,) = [ln for ln in curve_ax.get_lines() if ln.get_label() == f"norm.placement={placement} (n=2)"]
        steps, mean, _ = seed_mean_and_std(runs, "hessian/top_eig")
        assert list(line.get_xdata()) == steps
        np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-6)
