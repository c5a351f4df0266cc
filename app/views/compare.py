"""Compare: runs and baselines side by side, as a table and as bars, filterable."""

import plotly.express as px
import streamlit as st

import support as S
from locphylax_core import runview as R

st.title("Compare")
runs = [r for r in S.all_runs() if r["finished"]]
if not runs:
    st.info("No run has a finished stage yet.")
    st.stop()
ids = [r["run_id"] for r in runs]
current = S.selected_run_id()
default = [current] if current in ids else ids[:1]
chosen = st.multiselect("Runs", ids, default=default, key="cmp_runs")
views = [S.load_view(S.runs_root() / rid) for rid in chosen]
for v in views:
    if v.health not in ("done",):
        st.caption(f"`{v.run_id}` is {v.health}: only its finished stages are shown.")
table = R.compare_table(views)
if table.empty:
    st.info("Nothing to compare: the chosen runs have no results yet.")
    st.stop()
c = st.columns(3)
rows_all = list(dict.fromkeys(table["row"]))
rows = c[0].multiselect("Methods / stages", rows_all, default=rows_all, key="cmp_rows")
presets_all = sorted(set(map(str, table["preset"])))
presets = c[1].multiselect("Presets", presets_all, default=presets_all, key="cmp_presets")
metric_cols = [col for col in table.columns if col.endswith("%")]
metric = c[2].selectbox("Bar metric", metric_cols, index=metric_cols.index("ASR unknown %")
                        if "ASR unknown %" in metric_cols else 0, key="cmp_metric")
shown = table[table["row"].isin(rows) & table["preset"].astype(str).isin(presets)]
st.dataframe(shown.drop(columns=["key"]), hide_index=True, key="cmp_table")
if not shown.empty:
    fig = px.bar(shown, x="row", y=metric, color="run", barmode="group", template="plotly_white",
                 title=f"{metric} by method and run")
    fig.update_layout(yaxis_range=[0, 100], xaxis_title="")
    st.plotly_chart(fig, key="cmp_bars")
