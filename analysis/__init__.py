"""Analysis of run folders under results/: loading, width-law fits, speedups, plots, reports."""
