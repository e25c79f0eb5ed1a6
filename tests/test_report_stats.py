"""The few-seeds statistics of `bnexp report` and `bnexp seeds`, checked against
references written here independently: Holm and Bonferroni by hand and by the
textbook step-down rule, Hedges' g from its formula, power from the noncentral
t distribution integrated numerically (no scipy.stats), main effects and the
interaction F test from the textbook sums of squares of a balanced grid.

The runs are written here (metrics.json and .hydra/config.yaml): the tests are
about statistics, and chosen values make every verdict known in advance.
"""

from __future__ import annotations

import json
import math
import statistics
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import yaml

from bnexp import stats
from tests.conftest import rich_tables, run_inprocess


def write_run(root: Path, name: str, keys: dict, final: dict, seed: int, num: int, steps_to_target: int | None = None,
              replica: dict | None = None, wall_sec: float = 1.0) -> Path:
    """A completed run as bnexp writes it: .hydra/config.yaml (``keys`` dotted), hydra.yaml's job number, metrics.json."""
    config: dict = {"seed": seed, "train": {"target_acc": 0.6, "steps": 100}}
    for dotted, value in keys.items():
        *parents, last = dotted.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    record = {"status": "completed", "steps": 100, "total_steps": 100, "final": final, "best": final,
              "steps_to_target": steps_to_target, "time": {"wall_sec": wall_sec, "steps_per_sec": 100 / wall_sec}}
    if replica:
        record["replica"] = replica
    (run / "metrics.json").write_text(json.dumps(record))
    return run


# Four placements x 3 seeds whose verdicts are known: pre is clearly better than the
# baseline (none) in accuracy and loss, post clearly worse, preact indistinguishable.
ACC = {"none": [0.60, 0.61, 0.62], "pre": [0.80, 0.81, 0.83], "post": [0.40, 0.42, 0.41], "preact": [0.55, 0.63, 0.66]}
LOSS = {"none": [1.0, 1.1, 1.2], "pre": [0.5, 0.55, 0.62], "post": [2.0, 2.1, 2.25], "preact": [0.9, 1.1, 1.3]}
STEPS = {"none": [700, 800, 900], "pre": [300, 300, 400], "post": [1500, 1600, 1800], "preact": [600, 800, 1000]}


@pytest.fixture(scope="module")
def placements(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "sw"
    num = 0
    for placement in ("pre", "post", "preact", "none"):
        for seed in range(3):
            final = {"val/acc": ACC[placement][seed], "test/acc": ACC[placement][seed] - 0.01, "train/loss": LOSS[placement][seed]}
            write_run(root, f"norm.placement={placement},seed={seed}", {"norm.placement": placement}, final, seed, num,
                      STEPS[placement][seed], replica={"index": seed, "of": 3} if placement == "pre" else None)
            num += 1
    return root


def report(*args) -> tuple[int, str, str]:
    r = run_inprocess(["report", *map(str, args)], Path.cwd())
    return r.returncode, r.stdout, r.stderr


def as_json(*args) -> dict:
    code, out, err = report(*args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def vs(doc: dict, placement: str, metric: str) -> dict:
    (g,) = [g for g in doc["groups"] if g["group"] == f"norm.placement={placement}"]
    return g["metrics"][metric]["vs_baseline"]


# --------------------------------------------------------------------------- independent references


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm's adjusted p-values written out: sort, multiply the i-th smallest (from 0) by m - i,
    carry the running maximum, cap at 1, put back in order."""
    m = len(p)
    order = sorted(range(m), key=p.__getitem__)
    out, running = [0.0] * m, 0.0
    for i, j in enumerate(order):
        running = max(running, (m - i) * p[j])
        out[j] = min(1.0, running)
    return out


def step_down_rejects(p: list[float], alpha: float) -> set[int]:
    """The textbook step-down procedure: reject the i-th smallest p while p_(i) <= alpha / (m - i)."""
    rejected = set()
    for i, j in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        if p[j] > alpha / (len(p) - i):
            break
        rejected.add(j)
    return rejected


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(x)


@lru_cache(maxsize=None)
def _chi_weights(df: int) -> tuple[np.ndarray, np.ndarray]:
    """Simpson weights times the density of s = sqrt(V), V chi-square(df): the integrand
    is smooth in s (in V it has a square root's kink at 0)."""
    s = np.linspace(0.0, math.sqrt(df + 60 * math.sqrt(df) + 60), 8001)
    log_v_density = (df / 2 - 1) * np.log(np.where(s > 0, s**2, 1.0)) - s**2 / 2 - (df / 2) * math.log(2) - math.lgamma(df / 2)
    density = np.where(s > 0, np.exp(log_v_density) * 2 * s, 0.0)  # dV = 2 s ds
    h = s[1] - s[0]
    simpson = np.ones_like(s)
    simpson[1:-1:2], simpson[2:-1:2] = 4, 2
    return s, density * simpson * h / 3


def two_sided_tail(c: float, df: int, ncp: float) -> float:
    """P(|T| > c) for T = (Z + ncp) / sqrt(V / df), V chi-square(df): the integral over V
    of the normal tails, in float64 NumPy (the noncentral t's definition, not scipy.stats.nct)."""
    s, weights = _chi_weights(df)
    scale = c * s / math.sqrt(df)
    return float(np.sum(weights * ((1 - _normal_cdf(scale - ncp)) + _normal_cdf(-scale - ncp))))


def power_by_integration(n: int, d: float, alpha: float = 0.05) -> float:
    df = 2 * n - 2
    lo, hi = 0.0, 100.0
    for _ in range(60):  # the central t's critical value from the same integral at ncp = 0
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided_tail(mid, df, 0.0) > alpha else (lo, mid)
    return two_sided_tail((lo + hi) / 2, df, d * math.sqrt(n / 2))


# --------------------------------------------------------------------------- the statistics


def test_holm_and_bonferroni_match_a_hand_computed_example_and_the_step_down_rule():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> 0.06 (monotone).
    assert stats.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.adjust(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert stats.adjust(p, "none") == p
    rng = np.random.default_rng(1)
    for _ in range(200):
        ps = list(rng.uniform(0, 0.1, size=int(rng.integers(1, 25))))
        adjusted = stats.adjust(ps, "holm")
        assert adjusted == pytest.approx(holm_by_hand(ps))
        for alpha in (0.01, 0.05):
            assert {i for i, a in enumerate(adjusted) if a <= alpha} == step_down_rejects(ps, alpha)


def test_hedges_g_is_the_standardized_difference_times_the_small_sample_correction():
    a, b = [0.80, 0.81, 0.83], [0.60, 0.61, 0.62, 0.65]
    na, nb = len(a), len(b)
    sp = math.sqrt(((na - 1) * statistics.variance(a) + (nb - 1) * statistics.variance(b)) / (na + nb - 2))
    df = na + nb - 2
    j = math.gamma(df / 2) / (math.sqrt(df / 2) * math.gamma((df - 1) / 2))
    g = (statistics.mean(a) - statistics.mean(b)) / sp * j
    assert stats.hedges_g(a, b) == pytest.approx(g, rel=1e-12)
    assert j == pytest.approx(1 - 3 / (4 * df - 1), rel=5e-3)  # the usual approximation, for the record
    assert stats.hedges_g([1.0, 1.0], [2.0, 2.0]) is None


@pytest.mark.parametrize("n,d", [(2, 2.5), (3, 1.0), (5, 1.5), (12, 0.8), (40, 0.4)])
def test_power_matches_the_noncentral_t_integrated_independently(n, d):
    sd = 0.02
    assert stats.power(n, d * sd, sd) == pytest.approx(power_by_integration(n, d), abs=2e-5)


@pytest.mark.parametrize("effect,sd", [(0.0208, 0.0267), (0.05, 0.03), (0.3, 0.1), (1.0, 0.2)])
def test_seeds_needed_is_the_fewest_that_reach_80_percent_power(effect, sd):
    n = stats.seeds_needed(effect, sd)
    assert power_by_integration(n, effect / sd) >= 0.8 - 1e-5
    if n > 2:
        assert power_by_integration(n - 1, effect / sd) < 0.8
    assert stats.seeds_needed(-effect, sd) == n  # a difference either way needs the same
    assert stats.seeds_needed(effect, sd, target=0.9) >= n


def test_seeds_needed_has_no_answer_without_a_difference_or_spread_and_a_cap():
    assert stats.seeds_needed(0.0, 0.1) is None and stats.seeds_needed(0.1, 0.0) is None
    assert stats.seeds_needed(1e-4, 1.0) is None  # more than stats.MAX_SEEDS


def test_bootstrap_interval_is_the_same_for_a_fixed_seed_and_brackets_the_data():
    xs = list(np.random.default_rng(3).normal(0.65, 0.02, size=10))
    first = stats.interval(xs, "bootstrap")
    assert stats.interval(xs, "bootstrap") == first
    assert min(xs) <= first[0] < statistics.mean(xs) < first[1] <= max(xs)
    other = stats.bootstrap_interval([xs], lambda x, axis=-1: np.mean(x, axis=axis), seed=7)
    assert other != first and other == pytest.approx(first, abs=0.01)


def test_iqm_is_the_mean_of_the_middle_half():
    xs = [0.1, 0.5, 0.6, 0.9, 0.2, 3.0, 0.55, 0.4]
    assert stats.iqm(xs) == pytest.approx(np.mean(sorted(xs)[2:6]))
    assert stats.iqm([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)  # fewer than 4: nothing to trim


def grid_2x3(interaction: float) -> dict[tuple, list[float]]:
    """A balanced 2x3 grid, 4 runs a cell: mean 1, A adds 0.5 at its second level, B adds
    0, 0.2, 0.4, and A x B adds ``interaction`` at (a1, b2) only; fixed noise."""
    noise = np.random.default_rng(0).normal(0, 0.05, size=(2, 3, 4))
    cells = {}
    for i, a in enumerate(("a0", "a1")):
        for j, b in enumerate(("b0", "b1", "b2")):
            mu = 1 + 0.5 * i + 0.2 * j + (interaction if (i, j) == (1, 2) else 0)
            cells[(a, b)] = list(mu + noise[i, j])
    return cells


@pytest.mark.parametrize("interaction", [0.0, 0.6])
def test_main_effects_and_interaction_match_the_textbook_balanced_anova(interaction):
    from scipy.stats import f as f_dist, t as t_dist

    cells = grid_2x3(interaction)
    y = np.array([[cells[(a, b)] for b in ("b0", "b1", "b2")] for a in ("a0", "a1")])  # (A, B, runs)
    a_n, b_n, r = y.shape
    cell, grand = y.mean(axis=2), y.mean()
    a_means, b_means = cell.mean(axis=1), cell.mean(axis=0)
    sse = ((y - cell[..., None]) ** 2).sum()
    df_err = a_n * b_n * (r - 1)
    mse = sse / df_err
    ss_a = b_n * r * ((a_means - grand) ** 2).sum()
    ss_ab = r * ((cell - a_means[:, None] - b_means[None, :] + grand) ** 2).sum()
    f_a, f_ab = ss_a / (a_n - 1) / mse, ss_ab / ((a_n - 1) * (b_n - 1)) / mse

    result = stats.factorial(cells, ["A", "B"])
    assert result.df_error == df_err and result.mse == pytest.approx(mse)
    for key, means, runs in (("A", a_means, b_n * r), ("B", b_means, a_n * r)):
        half = t_dist.ppf(0.975, df_err) * math.sqrt(mse / runs)
        assert [lv.mean for lv in result.levels[key]] == pytest.approx(list(means))
        assert [lv.ci95 for lv in result.levels[key]] == [pytest.approx((m - half, m + half)) for m in means]
    (main_a, _), (ab,) = result.main, result.interactions
    assert (main_a.f, main_a.df1, main_a.df2) == (pytest.approx(f_a), 1, df_err)
    assert (ab.f, ab.df1, ab.df2) == (pytest.approx(f_ab), 2, df_err)
    assert ab.p == pytest.approx(f_dist.sf(f_ab, 2, df_err))
    assert (ab.p < 1e-6) == (interaction > 0)


def test_a_grid_without_repeated_runs_has_no_error_to_test_against():
    assert stats.factorial({("a", "x"): [1.0], ("a", "y"): [2.0], ("b", "x"): [3.0], ("b", "y"): [5.0]}, ["A", "B"]) is None


# --------------------------------------------------------------------------- through bnexp report


def test_each_group_gets_a_verdict_by_the_metrics_direction_with_holm_over_its_comparisons(placements):
    doc = as_json(placements)
    assert doc["statistics"] == {"aggregate": "mean", "ci": "t", "correction": "holm", "alpha": 0.05, "power": 0.8}
    expected = {"pre": "better", "post": "worse", "preact": "not distinguishable at n = 3"}
    for metric in ("val/acc", "train/loss", "steps to target"):
        records = {p: vs(doc, p, metric) for p in expected}
        assert {p: r["verdict"] for p, r in records.items()} == expected, metric
        assert vs(doc, "none", metric) is None  # the baseline
        ps = [records[p]["p"] for p in expected]
        assert [records[p]["p_adjusted"] for p in expected] == pytest.approx(holm_by_hand(ps))
        assert all(r["correction"] == "holm" for r in records.values())
    values = {"val/acc": ACC, "train/loss": LOSS}
    for metric, data in values.items():
        for p in expected:
            a, b = data[p], data["none"]
            sp = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
            j = math.gamma(2) / (math.sqrt(2) * math.gamma(1.5))
            assert vs(doc, p, metric)["hedges_g"] == pytest.approx((statistics.mean(a) - statistics.mean(b)) / sp * j)
    # Seeds only where the verdict is open: the fewest with 80% power for the observed difference.
    assert vs(doc, "pre", "val/acc")["seeds_needed"] is None
    record = vs(doc, "preact", "val/acc")
    d = statistics.mean(ACC["preact"]) - statistics.mean(ACC["none"])
    sp = math.sqrt((statistics.variance(ACC["preact"]) + statistics.variance(ACC["none"])) / 2)
    n = record["seeds_needed"]
    assert power_by_integration(n, d / sp) >= 0.8 - 1e-5 > power_by_integration(n - 1, d / sp)
    assert doc["steps_to_target"] == {"metric": "val/acc", "target": 0.6}


def test_bonferroni_and_no_correction_are_chosen_by_flag(placements):
    holm = as_json(placements)
    for method in ("bonferroni", "none"):
        doc = as_json(placements, "--correct", method)
        ps = [vs(doc, p, "val/acc")["p"] for p in ("pre", "post", "preact")]
        assert [vs(doc, p, "val/acc")["p_adjusted"] for p in ("pre", "post", "preact")] == pytest.approx(stats.adjust(ps, method))
        assert ps == [vs(holm, p, "val/acc")["p"] for p in ("pre", "post", "preact")]
        assert {vs(doc, p, "val/acc")["correction"] for p in ("pre", "post", "preact")} == {method}
    code, _, err = report(placements, "--correct", "sidak")
    assert code == 2 and "sidak" in err and "holm" in err


def test_bootstrap_intervals_are_reproducible_and_labelled_unreliable_below_8_seeds(placements):
    first, again = as_json(placements, "--ci", "bootstrap"), as_json(placements, "--ci", "bootstrap")
    assert first["statistics"]["ci"] == "bootstrap"
    assert [g["metrics"] for g in first["groups"]] == [g["metrics"] for g in again["groups"]]
    t = as_json(placements)
    assert vs(first, "pre", "val/acc")["ci95"] != vs(t, "pre", "val/acc")["ci95"]
    assert vs(first, "pre", "val/acc")["p"] == vs(t, "pre", "val/acc")["p"]  # Welch's p either way
    code, out, _ = report(placements, "--ci", "bootstrap")
    assert code == 0 and "percentile bootstrap, seeded (unreliable below n = 8)" in out


def test_iqm_aggregate_uses_the_interquartile_mean_bootstrap_and_a_permutation_test(placements):
    doc = as_json(placements, "--aggregate", "iqm")
    assert doc["statistics"]["aggregate"] == "iqm" and doc["statistics"]["ci"] == "bootstrap"
    rec = vs(doc, "pre", "val/acc")
    assert rec["test"] == "permutation"
    assert rec["p"] == pytest.approx(0.1)  # 3 vs 3 seeds, fully separated: 2 of the 20 splits are as extreme
    assert rec["verdict"].startswith("not distinguishable")  # no permutation test at n = 3 gets below 0.1
    (pre,) = [g for g in doc["groups"] if g["group"] == "norm.placement=pre"]
    assert pre["metrics"]["val/acc"]["iqm"] == pytest.approx(statistics.mean(ACC["pre"]))


def test_report_names_the_target_marks_stacks_and_shows_time_per_step(placements):
    code, out, _ = report(placements)
    assert code == 0
    assert "steps to val/acc ≥ 0.6" in out
    doc = as_json(placements)
    times = {g["group"]: g["time"] for g in doc["groups"]}
    assert times["norm.placement=pre"]["stacked"] == 3 and times["norm.placement=none"]["stacked"] is None
    # No event files here: each run's wall time over its steps (1 s / 100 steps).
    assert times["norm.placement=none"]["ms_per_step"] == pytest.approx(10.0)
    assert "×3" in out and "a stack (×R) times one step of all R replicas at once" in out


@pytest.mark.parametrize("columns", [80, 100])
def test_every_table_fits_the_terminal_and_never_splits_a_number(placements, tmp_path, columns, monkeypatch):
    grid = tmp_path / "grid"
    for i, (norm, lr) in enumerate((n, lr) for n in ("batch", "layer") for lr in (0.05, 0.1, 0.2)):
        for seed in range(2):
            final = {"val/acc": 0.6 + 0.01 * i + 0.003 * seed, "test/acc": 0.6, "train/loss": 1 - 0.02 * i - 0.01 * seed}
            write_run(grid, f"norm={norm},optim.lr={lr},seed={seed}", {"norm.kind": norm, "optim.lr": lr}, final, seed, 2 * i + seed)
    monkeypatch.setenv("COLUMNS", str(columns))
    for root in (placements, grid):
        code, out, _ = report(root)
        assert code == 0
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= columns, max(lines, key=len)
        doc = as_json(root)
        cells = [f"{g['metrics'][m]['mean']:.4f} ± {g['metrics'][m]['std']:.4f}" for g in doc["groups"] for m in ("val/acc", "train/loss")]
        cells += [f"{r['diff']:+.4f}" for g in doc["groups"] for r in [g["metrics"]["val/acc"]["vs_baseline"]] if r]
        cells += [r["verdict"] for g in doc["groups"] for r in [g["metrics"]["val/acc"]["vs_baseline"]] if r]
        table_lines = [line for line in lines if line.startswith("│")]
        for cell in cells:
            assert any(cell in line for line in table_lines), (cell, columns)
        # No number wraps onto a second line: a line that names no group continues a metric's
        # name (which may wrap at its spaces) and holds no value.
        for table in rich_tables(out):
            header, rows = table[0], table[1:]
            group_column = next(i for i, h in enumerate(header) if h in ("placement", "kind", "lr", "value", "effect"))
            assert all(row[group_column] or not any(row[group_column + 1:]) for row in rows), (header, columns)
    code, out, _ = report(grid)
    assert "main effects on val/acc" in out and "norm.kind × optim.lr" in out


def test_factorial_grid_gets_main_effects_and_interaction_in_json_and_tables(tmp_path):
    cells = grid_2x3(0.6)
    num = 0
    for (a, b), values in cells.items():
        for seed, v in enumerate(values):
            write_run(tmp_path / "g", f"{a},{b},seed={seed}", {"model.act": a, "optim.sched": b},
                      {"val/acc": v, "test/acc": v, "train/loss": 2 - v}, seed, num)
            num += 1
    doc = as_json(tmp_path / "g")
    fact = doc["factorial"]["val/acc"]
    ref = stats.factorial(cells, ["model.act", "optim.sched"])
    assert [lv["mean"] for lv in fact["main_effects"]["model.act"]] == pytest.approx([lv.mean for lv in ref.levels["model.act"]])
    y = np.array([[cells[(a, b)] for b in ("b0", "b1", "b2")] for a in ("a0", "a1")])
    assert [lv["mean"] for lv in fact["main_effects"]["optim.sched"]] == pytest.approx(list(y.mean(axis=(0, 2))))
    (inter,) = [t for t in fact["tests"] if len(t["effect"]) == 2]
    assert inter["effect"] == ["model.act", "optim.sched"] and inter["df"] == [2, 18] and inter["p"] < 1e-6
    code, out, _ = report(tmp_path / "g")
    assert "main effects on val/acc" in out and "model.act × optim.sched" in out
    md = run_inprocess(["report", str(tmp_path / "g"), "--format", "markdown"], Path.cwd()).stdout
    assert "| model.act × optim.sched |" in md


def test_bnexp_seeds_counts_seeds_for_a_chosen_difference(placements):
    r = run_inprocess(["seeds", str(placements), "--effect", "0.01", "--metric", "val/acc", "--format", "json"], Path.cwd())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["metric"] == "val/acc" and doc["effect"] == 0.01 and doc["power"] == 0.8
    rows = {row["group"]: row for row in doc["groups"]}
    assert set(rows) == {"norm.placement=pre", "norm.placement=post", "norm.placement=preact"}
    for p in ("pre", "post", "preact"):
        row = rows[f"norm.placement={p}"]
        sp = math.sqrt((statistics.variance(ACC[p]) + statistics.variance(ACC["none"])) / 2)
        assert row["pooled_std"] == pytest.approx(sp)
        n = row["seeds_needed"]
        assert power_by_integration(n, 0.01 / sp) >= 0.8 - 1e-5 > power_by_integration(n - 1, 0.01 / sp)
        assert row["power_now"] == pytest.approx(power_by_integration(3, 0.01 / sp), abs=1e-4)
    more = json.loads(run_inprocess(["seeds", str(placements), "--effect", "0.01", "--power", "0.95", "--format", "json"],
                                    Path.cwd()).stdout)
    assert all(m["seeds_needed"] > rows[m["group"]]["seeds_needed"] for m in more["groups"])
    table = run_inprocess(["seeds", str(placements), "--effect", "0.01"], Path.cwd())
    assert table.returncode == 0 and "seeds per group to detect a difference of +0.0100 in val/acc" in table.stdout


@pytest.mark.parametrize("args,says", [
    (["--power", "1.5"], "--power 1.5: allowed: a probability strictly between 0 and 1"),
    (["--effect", "0"], "--effect 0.0: allowed: a nonzero finite difference"),
    (["--metric", "val/nope"], "--metric val/nope: no run has it; allowed:"),
])
def test_bnexp_seeds_refuses_bad_input_in_one_line(placements, args, says):
    r = run_inprocess(["seeds", str(placements), *args], Path.cwd())
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr


@pytest.mark.parametrize("columns", [80, 100])
def test_a_sweeps_closing_output_ends_with_the_verdicts_and_seed_counts_and_fits_the_terminal(placements, columns, capsys,
                                                                                             monkeypatch):
    from bnexp.sweep import SweepStart, print_summary, read_sweep

    monkeypatch.setenv("COLUMNS", str(columns))
    print_summary(SweepStart(placements, started=0.0), read_sweep(placements))
    out = capsys.readouterr().out
    # Every table line fits (a line naming a path is printed whole, for copying, and wraps as the terminal wraps it).
    assert max(len(line) for line in out.splitlines() if line[:1] in "┏┃┡│├└") <= columns
    assert all(len(line) <= columns for line in out.splitlines() if str(placements) not in line)
    assert "12 jobs: 12 completed" in out and "comparison (mean ± std over seeds)" in out
    verdict = out[out.index("verdict: each group against the baseline norm.placement=none"):]
    rows = [row for table in rich_tables(verdict) for row in table[1:]]
    cells = {(row[1], cell) for row in rows for cell in row}
    assert {("pre", "better"), ("post", "worse"), ("preact", "not distinguishable at n = 3")} <= cells
    # The seed count of the open comparison, as the JSON report computes it.
    seeds = vs(as_json(placements), "preact", "val/acc")["seeds_needed"]
    assert ("preact", str(seeds)) in cells
    assert "×3" in out  # pre's seeds trained as one stack


def test_arms_that_share_the_baseline_key_are_each_compared_with_the_one_baseline_group(tmp_path):
    # A normalizer-free preset's arms: BN, and three ways to train with norm.placement=none
    # (no normalization) that differ from the plain one in other keys. Each is compared with the plain one.
    plain = {"norm.placement": "none", "model.init": "kaiming", "optim.clip": "none"}
    arms = {"bn": {**plain, "norm.placement": "pre"}, "none": plain, "fixup": {**plain, "model.init": "fixup"},
            "agc": {**plain, "optim.clip": "agc"}}
    acc = {"bn": [0.85, 0.84, 0.86], "none": [0.10, 0.75, 0.10], "fixup": [0.62, 0.76, 0.77], "agc": [0.76, 0.78, 0.77]}
    root, num = tmp_path / "sw", 0
    for arm, keys in arms.items():
        for seed in range(3):
            write_run(root, f"arm={arm},seed={seed}", keys, {"test/acc": acc[arm][seed]}, seed, num)
            num += 1
    doc = as_json(root, "--metric", "test/acc")
    by_arm = {}
    for g in doc["groups"]:
        key = dict(part.split("=") for part in g["group"].split(","))
        (arm,) = [a for a, k in arms.items() if all(key.get(n, v) == v for n, v in k.items())]
        by_arm[arm] = g["metrics"]["test/acc"].get("vs_baseline")
    assert by_arm["none"] is None  # the baseline itself
    for arm in ("bn", "fixup", "agc"):
        want = statistics.mean(acc[arm]) - statistics.mean(acc["none"])
        assert by_arm[arm] is not None and math.isclose(by_arm[arm]["diff"], want, abs_tol=1e-9), arm
