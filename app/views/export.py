"""Export: every figure as standalone HTML, the data as CSV, the summary as JSON, the config as YAML."""

import json

import pandas as pd
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F
from locphylax_core.errors import RunError
from locphylax_core.runs import RunDir

st.title("Export")
view = S.pick_run()
if view is None:
    st.stop()
st.write(f"Files of run {S.code(view.run_id)}. Figures are standalone HTML (plotly inlined: they open offline).")


@st.cache_data(show_spinner=False, max_entries=64)
def _html(path: str, stamp: tuple, what: str) -> bytes:
    v = R.open_run(path)
    if what.startswith("projection_"):
        method = what.removeprefix("projection_")
        coords, preds = R.projection(v, method)
        fig = F.projection_figure(coords, list(v.probe), preds, v.label_words, method)
    elif what == "heads":
        fig = F.head_heatmaps(R.head_grids(v, "victim")["delta_asr_unknown"],
                              R.head_grids(v, "stage2")["delta_asr_unknown"])
    elif what == "curves":
        fig = F.curves_figure(R.curve_rows(v), v.methods)
    else:
        casd = v.analysis["casd"]
        fig = F.casd_figure(casd["labels"], casd["matrix"], casd["metric"])
    return fig.to_html(include_plotlyjs=True, full_html=True, auto_play=False).encode()  # starts on its first stage


@st.cache_data(show_spinner=False, max_entries=64)
def _csv(path: str, stamp: tuple, what: str) -> bytes:
    v = R.open_run(path)
    if what == "results":
        df = R.results_table(v)
    elif what == "metrics":
        df = pd.json_normalize(R.curve_rows(v))
    elif what.startswith("projection_"):
        method = what.removeprefix("projection_")
        coords, preds = R.projection(v, method)
        df = F.projection_table(coords, list(v.probe), preds, v.label_words)
    elif what == "heads":
        df = F.head_table({k: g for stage in (v.analysis.get("head_ablation") or {})
                           for k, g in ((f"{stage}:{q}", a) for q, a in R.head_grids(v, stage).items())})
    elif what == "casd":  # a square matrix: its row labels are the first column
        casd = v.analysis["casd"]
        return F.casd_table(casd["labels"], casd["matrix"]).to_csv().encode()
    else:
        df = R.aggregation_table(v)
    return df.to_csv(index=False).encode()


stamp = R.run_stamp(view.path)
analysis = view.analysis or {}
figures = [f"projection_{m}" for m in (analysis.get("projections") or {})]
if all("unknown" in ((analysis.get("head_ablation") or {}).get(k) or {}).get("delta_asr", {})
       for k in ("victim", "stage2")):
    figures.append("heads")
if view.metrics:
    figures.append("curves")
if analysis.get("casd"):
    figures.append("casd")
tables = ["results"] * bool(view.summary) + ["metrics"] * bool(view.metrics) + \
    [f"projection_{m}" for m in (analysis.get("projections") or {})] + \
    ["heads"] * bool(analysis.get("head_ablation")) + ["aggregation"] * bool(analysis.get("aggregation")) + \
    ["casd"] * bool(analysis.get("casd"))

left, right = st.columns(2)
with left:
    st.markdown("**Figures (HTML)**")
    if not figures:
        st.caption("No figure yet: the run has no metrics or analysis.")
    for what in figures:
        st.download_button(f"{S.esc(what)}.html", data=lambda w=what: _html(view.path, stamp, w),
                           file_name=f"{view.run_id}_{what}.html", mime="text/html", key=f"dl-html-{what}")
with right:
    st.markdown("**Data (CSV, JSON, YAML)**")
    for what in tables:
        st.download_button(f"{S.esc(what)}.csv", data=lambda w=what: _csv(view.path, stamp, w),
                           file_name=f"{view.run_id}_{what}.csv", mime="text/csv", key=f"dl-csv-{what}")
    if view.summary:
        st.download_button("summary.json", data=json.dumps(view.summary, indent=2),
                           file_name=f"{view.run_id}_summary.json", mime="application/json", key="dl-summary")
    if view.config:  # a config.yaml that reads as one; served only as a regular file inside the run folder
        try:
            config_bytes = R.run_file(view, RunDir.CONFIG)
        except RunError as e:
            st.warning(f"config.yaml is not offered: {S.esc(getattr(e, 'reason', e))}.")
        else:
            st.download_button("config.yaml", data=config_bytes, file_name=f"{view.run_id}_config.yaml",
                               mime="text/yaml", key="dl-config")
    elif any(p.startswith(RunDir.CONFIG) for p in view.problems):
        st.caption("config.yaml is not offered: it is damaged (see the message above).")
