"""Evaluation: a model's Dice on a site's cases, the paper's cross-site statistics, the convergence criterion."""

from fedseg.evaluation.crosssite import (
    OVERALL,
    CrossSiteTable,
    PairedTest,
    cross_site_table,
    paired_t_test,
)
from fedseg.metrics import Summary, dice_coefficient, format_mean_sd, summarize

__all__ = [
    "OVERALL",
    "CrossSiteTable",
    "PairedTest",
    "Summary",
    "cross_site_table",
    "dice_coefficient",
    "format_mean_sd",
    "paired_t_test",
    "summarize",
]
