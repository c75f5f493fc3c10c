"""Evaluation: Dice overlap and the paper's cross-site tables (pure functions over arrays)."""

from fedseg.evaluation.crosssite import (
    OVERALL,
    CrossSiteTable,
    PairedTest,
    cross_site_table,
    paired_t_test,
    write_tables,
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
    "write_tables",
]
