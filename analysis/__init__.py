"""Analysis of run folders under results/: loading, width-law fits, speedups, plots, reports.

Reads run folders only (config.yaml, metrics.csv, summary.json); never imports the model or torch.

    import analysis
    frame = analysis.load_grid("results/width_sweep")        # one row per (run, logged step)
    fit = analysis.fit_log_linear(finals["r"], finals["loss"])  # loss = intercept + slope·log2(r)
    ratio = analysis.token_speedup(base_tokens, base_loss, tokens, loss)  # > 1: fewer tokens needed
    details = analysis.token_speedup_details(..., extrapolate=True)    # .ratio, .extrapolated, .gap
    analysis.write_report("results/width_sweep")              # what `vwn report` runs

Modules: load (run folders -> DataFrame), fits (width law, power law), speedup (ratio curves),
tables (seed means, comparisons, the speedup table), plots (figures), report (files),
paper (the paper's reference numbers).
"""

from analysis.fits import LogLinearFit, PowerLaw, fit_log_linear, fit_power_law
from analysis.load import SkippedRunWarning, load_grid
from analysis.paper import PAPER
from analysis.report import write_report
from analysis.speedup import SpeedupDetails, token_speedup, token_speedup_details

__all__ = [
    "PAPER",
    "LogLinearFit",
    "PowerLaw",
    "SkippedRunWarning",
    "SpeedupDetails",
    "fit_log_linear",
    "fit_power_law",
    "load_grid",
    "token_speedup",
    "token_speedup_details",
    "write_report",
]
