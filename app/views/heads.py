"""Heads: attention-head ablation sensitivity, [layer, head], before / after / difference."""

import numpy as np
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F

st.title("Heads")
st.write("Each cell is one attention head replaced by uniform attention; the colour is how much that moves "
         "the quantity chosen below (negative: ablating the head lowers it).")
view = S.pick_run(need_analysis=True)
if view is None or not view.analysed:
    st.stop()
ha = view.analysis.get("head_ablation") or {}
stages = list(ha)
if len(stages) < 1:
    st.warning("This run's analysis has no head ablation (it was run with --no-heads).")
    st.stop()

grids = {k: R.head_grids(view, k) for k in stages}
quantities = list(grids[stages[0]])
names = {q: ("ΔCACC" if q == "delta_cacc" else f"ΔASR ({q.removeprefix('delta_asr_')})") for q in quantities}
c = st.columns(3)
before = c[0].selectbox("Before", stages, index=0, format_func=F.stage_title, key="heads_before")
after = c[1].selectbox("After", stages, index=len(stages) - 1, format_func=F.stage_title, key="heads_after")
quantity = c[2].selectbox("Quantity", quantities, index=quantities.index("delta_asr_unknown")
                          if "delta_asr_unknown" in quantities else 0, format_func=names.get, key="heads_quantity")
st.plotly_chart(F.head_heatmaps(grids[before][quantity], grids[after][quantity], before, after, names[quantity]),
                key="heads_fig")
for k in dict.fromkeys([before, after]):
    if not np.isfinite(grids[k][quantity]).any():
        st.info(f"{F.stage_title(k)}: {names[quantity]} is undefined for every head, because no probe input "
                "qualified (the headline ASR counts only inputs the model answers correctly without the trigger).")

n_layers, n_heads = grids[before][quantity].shape
left, right = st.columns(2)
with left:
    st.markdown("**One head**")
    h = st.columns(2)
    layer = int(h[0].number_input("layer", 0, n_layers - 1, 0, key="heads_layer"))
    head = int(h[1].number_input("head", 0, n_heads - 1, 0, key="heads_head"))
    rows = []
    for k in dict.fromkeys([before, after]):
        g = grids[k]
        rows.append({"stage": F.stage_title(k),
                     **{names[q]: (None if not np.isfinite(g[q][layer, head]) else round(100 * g[q][layer, head], 1))
                        for q in quantities}})
    st.dataframe(rows, hide_index=True, key="heads_one")
    st.caption(f"Head L{layer}.h{head}, in points (percentage points of the rate).")
with right:
    st.markdown(f"**Top critical heads, {F.stage_title(after)}** (largest |ΔASR unknown|)")
    st.dataframe(R.critical_heads(view, after), hide_index=True, key="heads_top_after")
    st.markdown(f"**Top critical heads, {F.stage_title(before)}**")
    st.dataframe(R.critical_heads(view, before), hide_index=True, key="heads_top_before")
