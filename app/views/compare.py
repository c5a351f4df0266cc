"""Compare: runs and baselines side by side, as a table and as bars, filterable.

The runs, the method / stage and preset filters and the bar metric are kept in the URL (?runs=,
?rows=, ?presets=, ?metric=), so a link restores the view.
"""

import plotly.express as px
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.registry import DEFENSES


def keep_new_options_chosen(key: str, options: list) -> None:
    """A filter that starts with everything chosen also chooses options that appear later (a run of
    another preset added to the comparison), instead of silently hiding them; options the user
    took out stay out."""
    seen_key = f"{key}_offered"
    seen = st.session_state.get(seen_key)
    if seen is not None and key in st.session_state:
        st.session_state[key] = list(st.session_state[key]) + [o for o in options if o not in seen
                                                                and o not in st.session_state[key]]
    st.session_state[seen_key] = list(options)


def method_label(key: str, run_method: str) -> str:
    """What trained a result row: nothing for the victim, the run's ``defense.method`` (locphylax or
    locphylax+) for Locphylax's stages, the baseline itself for a baseline's row (its key is the
    baseline's registry name)."""
    if key == "victim":
        return "none (victim)"
    if key in ("stage1", "stage2"):
        return run_method
    return DEFENSES.label(key)


st.title("Compare")
runs = [r for r in S.all_runs() if r["finished"]]
if not runs:
    st.info("No run has a finished stage yet.")
    st.stop()
ids = [r["run_id"] for r in runs]
current = S.selected_run_id()
if current is not None and current not in ids and "cmp_runs" not in st.session_state and "runs" not in st.query_params:
    st.info(f"Run {S.code(current)} is not in this run store (or has no finished stage yet); showing {S.code(ids[0])}.")
S.restore_from_link("cmp_runs", "runs", ids, [current] if current in ids else ids[:1], "runs", many=True,
                    where="here", keep_chosen=True)
chosen = st.multiselect("Runs", ids, key="cmp_runs")
st.query_params["runs"] = chosen or ""
if not chosen:
    st.info("Choose at least one run to compare.")
    st.stop()
views = [S.load_view(S.runs_root() / rid) for rid in chosen]
for v in views:
    if v.health not in ("done",):
        st.caption(f"{S.code(v.run_id)} is {S.esc(v.health)}: only its finished stages are shown.")
table = R.compare_table(views)
if table.empty:
    st.info("Nothing to compare: the chosen runs have no results yet.")
    st.stop()
# compare_table puts the run's own defense on every row; each row gets what trained it instead
run_methods = {v.run_id: v.config.get("defense", {}).get("method", "locphylax") for v in views}
table["method"] = [method_label(key, run_methods[run]) for key, run in zip(table["key"], table["run"])]

c = st.columns(3)
rows_all = list(dict.fromkeys(table["row"]))
S.restore_from_link("cmp_rows", "rows", rows_all, rows_all, "methods / stages", many=True, where="here",
                    keep_chosen=True)
keep_new_options_chosen("cmp_rows", rows_all)
rows = c[0].multiselect("Methods / stages", rows_all, key="cmp_rows")
presets_all = sorted(set(map(str, table["preset"])))
S.restore_from_link("cmp_presets", "presets", presets_all, presets_all, "presets", many=True, where="here",
                    keep_chosen=True)
keep_new_options_chosen("cmp_presets", presets_all)
presets = c[1].multiselect("Presets", presets_all, key="cmp_presets")
metric_cols = [col for col in table.columns if col.endswith("%")]
S.restore_from_link("cmp_metric", "metric", metric_cols,
                    "ASR unknown %" if "ASR unknown %" in metric_cols else metric_cols[0], "bar metric",
                    where="here")
metric = c[2].selectbox("Bar metric", metric_cols, key="cmp_metric")
st.query_params.update({"rows": rows or "", "presets": presets or "", "metric": metric})
missing = [what for what, chosen_now in (("method or stage", rows), ("preset", presets)) if not chosen_now]
if missing:
    st.info(f"Choose at least one {' and one '.join(missing)} to show.")
    st.stop()

shown = table[table["row"].isin(rows) & table["preset"].astype(str).isin(presets)]
# what was trained and its numbers first, so a narrow screen scrolls only past the run's details
first = ["row", "method", *metric_cols]
st.dataframe(shown.drop(columns=["key"]), hide_index=True, key="cmp_table",
             column_order=first + [col for col in shown.columns if col not in first and col != "key"])
if shown.empty:
    st.info("No row matches these filters.")
else:
    fig = px.bar(shown, x="row", y=metric, color="run", barmode="group", template="plotly_white",
                 title=f"{metric} by method and run")
    # the value on every bar: one at 0-0.3% has no visible height
    fig.update_traces(texttemplate="%{y:.1f}", textposition="outside", cliponaxis=False)
    fig.update_layout(yaxis_range=[0, 105], xaxis_title="", legend=dict(orientation="h", y=-0.2))
    st.plotly_chart(fig, key="cmp_bars")
    undefined = shown[shown[metric].isna()]
    if len(undefined):
        st.caption(f"No bar where {S.esc(metric)} is undefined (n/a; e.g. an ASR with no qualifying input): "
                   + ", ".join(f"{S.esc(r)} ({S.esc(run)})" for r, run in zip(undefined["row"], undefined["run"])) + ".")
