"""The optimization report: per-pass records, extra sections with plots, progress lines, HTML."""

from graphopt.report.records import PassRecord, Report, sum_counts, sum_near_misses
from graphopt.report.sections import PlotSpec, ReportSection, format_cell

__all__ = ["PassRecord", "PlotSpec", "Report", "ReportSection", "format_cell", "sum_counts",
           "sum_near_misses"]
