"""``capfilt report``: one self-contained HTML page summarising a demo run folder.

    from capfilt.report import write_report
    write_report("demo_run")            # -> demo_run/report.html

The page holds the retrieval comparison (baseline vs CapFilt), the filter's quality on the web
noise, loss curves, ITM score histograms and example images with their texts and decisions;
parts of the run that are missing are listed instead of failing.
"""

from capfilt.report.load import RunData, load_run
from capfilt.report.page import render_report, write_report

__all__ = ["RunData", "load_run", "render_report", "write_report"]
