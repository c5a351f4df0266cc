"""Analyses of a run, per stage: aggregation of the probe-set representations (metrics and aligned
projections), attention-head ablation, and CASD. Each returns plain numpy arrays and dicts;
:mod:`.figures` turns stored results into plotly figures. ``analyze_run`` writes them all to
``analysis.json`` in the run folder."""

from .run_analysis import ANALYSIS_SCHEMA, analyze_run, export_figures, load_arrays

__all__ = ["analyze_run", "export_figures", "load_arrays", "ANALYSIS_SCHEMA"]
