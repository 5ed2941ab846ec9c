"""Review of the study's statistics: each test checks the study against an independent oracle
(closed-form Student t CDFs, Holm's procedure by hand, exact rational accuracies)."""
from __future__ import annotations

import json
import math
import random

import pytest

from smskd_fast.training.stats import paired_comparison, summarize_values
from smskd_fast.training.study import analyse, format_report


def two_sided_p_df2(t: float) -> float:
    """Student t with 2 df: P(|T| >= |t|) = 1 - |t| / sqrt(2 + t^2) (closed form)."""
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def two_sided_p_df4(t: float) -> float:
    """Student t with 4 df: F(t) = 1/2 + 3/8 * u * (1 - t^2 / (12 (1 + t^2/4))), u = t / sqrt(1 + t^2/4)."""
    t = abs(t)
    q = 1.0 + t * t / 4.0
    upper = 0.5 - 0.375 * (t / math.sqrt(q)) * (1.0 - t * t / (12.0 * q))
    return 2.0 * upper


def t_statistic(differences):
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    return mean / (sd / math.sqrt(n))


def study_rows(table, seeds):
    """Rows as run_study stores them: table[variant] = [(test, val) per seed]."""
    return [{"variant": variant, "seed": seed, "last_test_acc": test, "last_val_acc": val, "epochs": 3}
            for variant, pairs in table.items() for seed, (test, val) in zip(seeds, pairs)]


def report_line(report: str, variant: str) -> str:
    start = report.index("paired against")
    return next(line for line in report[start:].splitlines() if line.startswith(variant + " "))


def test_closed_form_oracles_agree_with_printed_tables():
    # t_{0.975, 2} = 4.3027 and t_{0.975, 4} = 2.7764 (four-decimal tables): two-sided p 0.05. The
    # table's rounding (5e-5 in t) moves p by at most 5e-5 * 2 * density (< 0.06 here): 3e-6.
    assert two_sided_p_df2(4.3027) == pytest.approx(0.05, abs=3e-6)
    assert two_sided_p_df4(2.7764) == pytest.approx(0.05, abs=3e-6)


def test_paired_p_value_matches_the_closed_form_t_distribution():
    a = [95.1, 96.3, 94.8, 95.9, 96.0]
    b = [94.2, 95.9, 94.9, 95.0, 95.1]
    d = [x - y for x, y in zip(a, b)]
    paired = paired_comparison(a, b)
    assert paired.t == pytest.approx(t_statistic(d), rel=1e-12)
    assert paired.p_value == pytest.approx(two_sided_p_df4(t_statistic(d)), rel=1e-9)
    three = paired_comparison(a[:3], b[:3])
    assert three.p_value == pytest.approx(two_sided_p_df2(t_statistic(d[:3])), rel=1e-9)


def test_pairing_is_by_seed_not_by_row_order():
    seeds = [3, 7, 11]
    table = {"kd": [(90.0, 89.0), (92.0, 91.0), (95.0, 94.0)],
             "smskd": [(89.0, 88.5), (92.5, 90.0), (93.0, 93.5)]}
    rows = study_rows(table, seeds)
    random.Random(0).shuffle(rows)
    analysis = analyse(rows, ["kd", "smskd"], seeds)
    comparison = analysis["paired"]["smskd"]["last_test_acc"]
    expected = [-1.0, 0.5, -2.0]
    assert comparison["differences"] == pytest.approx(expected)
    assert comparison["p_value"] == pytest.approx(two_sided_p_df2(t_statistic(expected)), rel=1e-9)


def test_p_below_0_001_is_reported_as_below_0_001_not_as_zero():
    seeds = [0, 1, 2, 3, 4]
    kd = [95.0, 96.0, 94.0, 95.5, 96.5]
    gaps = [3.0, 3.1, 2.9, 3.05, 2.95]
    table = {"kd": [(x, x) for x in kd], "smskd": [(x - g, x - g) for x, g in zip(kd, gaps)]}
    analysis = analyse(study_rows(table, seeds), ["kd", "smskd"], seeds)
    p = analysis["paired"]["smskd"]["last_test_acc"]["p_value"]
    expected = two_sided_p_df4(t_statistic([-g for g in gaps]))
    assert expected < 1e-3 and p == pytest.approx(expected, rel=1e-6)
    line = report_line(format_report(analysis), "smskd")
    assert "p<0.001" in line and "p=0.000" not in line


def test_equal_nonzero_differences_give_a_statement_not_p_zero():
    # Exactly equal differences, and equal up to rounding: 10 more of 359 test images right on
    # every seed (the same rational difference 1000/359 points, floats differing by ~1e-14).
    cases = [([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]),
             ([100 * 340 / 359, 100 * 341 / 359, 100 * 300 / 359],
              [100 * 330 / 359, 100 * 331 / 359, 100 * 290 / 359])]
    for a, b in cases:
        paired = paired_comparison(a, b)
        assert paired.p_value is None and paired.t is None
        assert "no spread" in paired.note
        json.dumps(paired.as_dict(), allow_nan=False)  # strict JSON: no Infinity / NaN
    seeds = [0, 1, 2]
    a, b = cases[1]
    table = {"kd": [(x, x) for x in a], "only_rkd": [(x, x) for x in b]}
    analysis = analyse(study_rows(table, seeds), ["kd", "only_rkd"], seeds)
    json.dumps(analysis, allow_nan=False)
    report = format_report(analysis)
    line = report_line(report, "only_rkd")
    assert "p n/a" in line and "p=0.000" not in line and "p<0.001" not in line
    assert "note: only_rkd, test: every one of the 3 differences is -2.79: no spread" in report


def test_all_zero_differences_keep_p_one():
    paired = paired_comparison([1.0, 2.0, 3.5], [1.0, 2.0, 3.5])
    assert paired.p_value == 1.0 and paired.t == 0.0


def test_single_seed_study_writes_strict_json_and_says_there_is_no_test():
    table = {"student_alone": [(90.0, 89.0)], "kd": [(93.0, 92.5)], "smskd": [(91.0, 91.5)]}
    analysis = analyse(study_rows(table, [0]), ["student_alone", "kd", "smskd"], [0])
    json.dumps(analysis, allow_nan=False)
    summary = analysis["summaries"]["kd"]["last_test_acc"]
    assert summary["n"] == 1 and summary["low"] is None and summary["high"] is None
    comparison = analysis["paired"]["smskd"]["last_val_acc"]
    assert comparison["mean"] == pytest.approx(-1.0) and comparison["p_value"] is None
    report = format_report(analysis)
    assert "nan" not in report.lower()
    assert "one seed: no interval, no test" in report_line(report, "smskd")
    assert summarize_values([4.0]).low is None


def test_shared_teacher_is_one_model_not_several_seeds():
    seeds = [0, 1, 2]
    table = {"teacher": [(70.0, 68.0)] * 3, "student_alone": [(54.0, 53.0), (53.5, 53.2), (54.4, 52.9)],
             "kd": [(55.0, 55.1), (56.0, 55.4), (55.5, 56.0)]}
    analysis = analyse(study_rows(table, seeds), ["student_alone", "kd"], seeds, teacher_seed=0)
    teacher = analysis["summaries"]["teacher"]
    assert teacher["last_test_acc"]["n"] == 1 and teacher["last_test_acc"]["low"] is None
    assert teacher["values"]["last_test_acc"] == [70.0]
    teacher_line = next(line for line in format_report(analysis).splitlines() if line.startswith("teacher "))
    assert "n=1, no interval" in teacher_line and "+- 0.00" not in teacher_line
    own = {**table, "teacher": [(70.0, 68.0), (71.0, 69.0), (69.5, 68.5)]}  # a teacher per seed
    assert analyse(study_rows(own, seeds), ["student_alone", "kd"], seeds)["summaries"]["teacher"][
        "last_test_acc"]["n"] == 3


def test_holm_adjustment_matches_the_textbook_procedure():
    from smskd_fast.training.stats import holm

    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.02, None]) == [pytest.approx(0.04), None]  # an undefined test still counts

    seeds = [0, 1, 2]
    table = {"kd": [(95.0, 94.0), (96.0, 95.0), (94.0, 93.5)],
             "summed": [(94.0, 93.0), (95.5, 94.8), (93.2, 92.0)],
             "sequential_no_reference": [(93.0, 92.1), (95.0, 93.0), (92.5, 92.6)],
             "smskd": [(94.5, 93.0), (95.9, 94.5), (93.0, 93.6)]}
    variants = list(table)
    analysis = analyse(study_rows(table, seeds), variants, seeds)
    for metric, column in (("last_test_acc", 0), ("last_val_acc", 1)):
        names = [v for v in variants if v != "kd"]
        raw = [two_sided_p_df2(t_statistic([x[column] - y[column] for x, y in zip(table[v], table["kd"])]))
               for v in names]
        order = sorted(range(3), key=lambda i: raw[i])
        expected, running = {}, 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (3 - rank) * raw[i]))
            expected[names[i]] = running
        for name in names:
            assert analysis["paired"][name][metric]["p_holm"] == pytest.approx(expected[name], rel=1e-9)
    report = format_report(analysis)
    assert "Holm" in report and "3 comparisons" in report


def test_a_missing_seed_is_refused_by_name():
    seeds = [0, 1, 2]
    rows = study_rows({"kd": [(95.0, 94.0)] * 3, "smskd": [(94.0, 93.0)] * 3}, seeds)
    rows = [row for row in rows if not (row["variant"] == "smskd" and row["seed"] == 2)]
    with pytest.raises(ValueError, match="smskd seed 2"):
        analyse(rows, ["kd", "smskd"], seeds)


def test_plot_of_a_single_seed_study(tmp_path):
    pytest.importorskip("matplotlib")
    from smskd_fast.training.study import plot_study

    table = {"student_alone": [(90.0, 89.0)], "kd": [(93.0, 92.5)], "smskd": [(91.0, 91.5)]}
    analysis = analyse(study_rows(table, [0]), ["student_alone", "kd", "smskd"], [0])
    assert plot_study(analysis, tmp_path / "study.png").is_file()
