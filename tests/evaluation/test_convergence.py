"""Convergence of a fold model: the mean of its last 20 % of epochs within 0.02 of its best."""

from __future__ import annotations

from fedseg.evaluation.convergence import FoldCurve, convergence_summary


def curve(y, model="private:nci", fold=0) -> FoldCurve:
    return FoldCurve("private", model, fold, tuple(range(1, len(y) + 1)), tuple(y))


def test_a_plateau_has_converged_and_a_climb_has_not():
    plateau = curve([0.2, 0.5, 0.7, 0.80, 0.81, 0.80, 0.81, 0.80, 0.81, 0.80])
    assert plateau.converged and plateau.best == 0.81 and plateau.best_at == 5
    assert plateau.tail_mean == 0.805  # last 2 of 10
    climbing = curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.72, 0.75, 0.8])
    assert climbing.best_at == 10 and climbing.tail_mean == 0.775 and not climbing.converged


def test_a_lucky_spike_does_not_count_as_converged():
    spike = curve([0.3, 0.5, 0.9, 0.6, 0.6, 0.62, 0.61, 0.6, 0.61, 0.6])
    assert spike.best_at == 3 and not spike.converged


def test_the_summary_counts_the_folds_that_converged():
    summary = convergence_summary([curve([0.5, 0.8, 0.8, 0.8, 0.8]), curve([0.1, 0.5, 0.9, 0.5, 0.5], fold=1)])
    assert summary.startswith("1 of 2 fold models converged (50 %)")
    assert summary.endswith("last 20% of epochs/rounds is within 0.02 of their best.")
    assert convergence_summary([]) == "No validation curves were recorded."
