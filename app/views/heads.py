"""Heads: attention-head ablation sensitivity, [layer, head], before / after / difference.

A head is picked by clicking its cell in any panel, or with the layer / head fields; its attention
pattern on an input is drawn for the two stages compared. The stages,
quantity and head are kept in the URL (?before=, ?after=, ?qty=, ?head=L<layer>.h<head>), so a link
restores the view.
"""

import re

import numpy as np
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F


def restore_head(n_layers: int, n_heads: int) -> None:
    """The layer and head fields' starting values, from ?head=L<layer>.h<head> the first time."""
    fields = ("heads_layer", "heads_head")
    if all(k in st.session_state for k in fields):
        if not (0 <= st.session_state["heads_layer"] < n_layers and 0 <= st.session_state["heads_head"] < n_heads):
            st.session_state["heads_layer"], st.session_state["heads_head"] = 0, 0  # a smaller model
        return
    st.session_state["heads_layer"], st.session_state["heads_head"] = 0, 0
    asked = st.query_params.get("head")
    if asked is None:
        return
    m = re.fullmatch(r"L(\d+)\.h(\d+)", asked)
    if m and int(m[1]) < n_layers and int(m[2]) < n_heads:
        st.session_state["heads_layer"], st.session_state["heads_head"] = int(m[1]), int(m[2])
    else:
        st.info(f"The link's head {S.code(asked)} is not a head of this model (L0.h0 to L{n_layers - 1}.h{n_heads - 1}); "
                "showing L0.h0 instead.")


def apply_click(n_layers: int, n_heads: int) -> None:
    """A click on a cell (the chart's selection, from the last rerun) moves the layer / head fields
    there, once per new click, so the fields stay free to change afterwards."""
    state = st.session_state.get("heads_fig")
    points = ((state or {}).get("selection") or {}).get("points") or []
    picked = None
    for p in points:
        cell = p.get("customdata")
        if isinstance(cell, (list, tuple)) and len(cell) >= 2:  # [layer, head, value]
            picked = (int(cell[0]), int(cell[1]))
    if picked is None:  # nothing selected (a click deselected it): the next click counts again
        st.session_state["heads_clicked"] = None
        return
    if picked == st.session_state.get("heads_clicked"):
        return
    st.session_state["heads_clicked"] = picked
    if 0 <= picked[0] < n_layers and 0 <= picked[1] < n_heads:
        st.session_state["heads_layer"], st.session_state["heads_head"] = picked


st.title("Heads")
st.write("Each cell is one attention head replaced by uniform attention; its number is how much that moves "
         "the quantity chosen below, in points (negative: ablating the head lowers it). Click a cell to see "
         "that head below.")
view = S.pick_run(need_analysis=True)
if view is None or not view.analysed:
    st.stop()
ha = view.analysis.get("head_ablation") or {}
stages = list(ha)
if len(stages) < 1:
    if view.analysis.get("complete", True):
        st.warning("This run's analysis has no head ablation (it was run with --no-heads).")
    else:  # a running analysis writes each part as it finishes
        st.info("The head ablation of this run is still being computed; it appears here when written.")
    st.stop()

grids = {k: R.head_grids(view, k) for k in stages}
quantities = list(grids[stages[0]])
names = {q: ("ΔCACC" if q == "delta_cacc" else f"ΔASR ({q.removeprefix('delta_asr_')})") for q in quantities}
S.restore_from_link("heads_before", "before", stages, stages[0], "stage", name=F.stage_title)
S.restore_from_link("heads_after", "after", stages, stages[-1], "stage", name=F.stage_title)
S.restore_from_link("heads_quantity", "qty", quantities, "delta_asr_unknown" if "delta_asr_unknown" in quantities
                    else quantities[0], "quantity", name=names.get)
c = st.columns(3)
before = c[0].selectbox("Before", stages, format_func=F.stage_title, key="heads_before")
after = c[1].selectbox("After", stages, format_func=F.stage_title, key="heads_after")
quantity = c[2].selectbox("Quantity", quantities, format_func=names.get, key="heads_quantity")

n_layers, n_heads = grids[before][quantity].shape
restore_head(n_layers, n_heads)
apply_click(n_layers, n_heads)
layer, head = st.session_state["heads_layer"], st.session_state["heads_head"]
st.plotly_chart(F.head_heatmaps(grids[before][quantity], grids[after][quantity], before, after, names[quantity],
                                pickable=True, highlight=(layer, head)),
                key="heads_fig", on_select="rerun", selection_mode="points")
for k in dict.fromkeys([before, after]):
    if not np.isfinite(grids[k][quantity]).any():
        st.info(f"{S.esc(F.stage_title(k))}: {S.esc(names[quantity])} is undefined for every head, because no probe input "
                "qualified (the headline ASR counts only inputs the model answers correctly without the trigger).")

st.markdown("**One head** (click a cell above, or type its layer and head)")
h = st.columns([1, 1, 4])
layer = int(h[0].number_input("layer", 0, n_layers - 1, key="heads_layer"))
head = int(h[1].number_input("head", 0, n_heads - 1, key="heads_head"))
st.query_params.update({"before": before, "after": after, "qty": quantity, "head": f"L{layer}.h{head}"})
rows = []
for k in dict.fromkeys([before, after]):
    g = grids[k]
    rows.append({"stage": F.stage_title(k),
                 **{names[q]: (None if not np.isfinite(g[q][layer, head]) else round(100 * g[q][layer, head], 1))
                    for q in quantities}})
points = {names[q]: st.column_config.NumberColumn(names[q], format="%+.1f", help=f"{S.esc(names[q])} in points (percentage "
                                                  "points of the rate); empty: no probe input qualified")
          for q in quantities}
st.dataframe(rows, hide_index=True, key="heads_one", width="stretch",
             column_config={"stage": st.column_config.TextColumn("stage", width="medium"), **points})
st.caption(f"Head L{layer}.h{head}, in points (percentage points of the rate).")

st.markdown(f"**Attention of head L{layer}.h{head}** on one input, {S.esc(F.stage_title(before))} and "
            f"{S.esc(F.stage_title(after))}")
probe_texts = [r["text"] for r in view.probe if r["group"] == "unknown"] or [r["text"] for r in view.probe]
st.session_state.setdefault("heads_text", probe_texts[0] if probe_texts else "")
text = st.text_input("An input (a hidden-trigger probe sentence to start with)", key="heads_text")
if text.strip() and st.toggle("Show this head's attention", key="heads_attn"):
    with_model = R.stages_with_model(view)
    panels = st.columns(2)
    for col, k in zip(panels, dict.fromkeys([before, after])):
        if k not in with_model:
            col.info(f"{S.esc(F.stage_title(k))} has no stored checkpoint to compute attention with.")
            continue
        r = S.sentence_attention(view, k, text)
        col.plotly_chart(F.attention_figure(r["pattern"][layer], r["tokens"], layer, heads=[head]).update_layout(
            title=f"{F.stage_title(k)}: L{layer}.h{head}"), key=f"heads_attn_{k}")

critical = {"ΔASR unknown (points)": st.column_config.NumberColumn("ΔASR unknown", format="%+.1f",
                                                                    help="points: percentage points of the rate"),
            "ΔCACC (points)": st.column_config.NumberColumn("ΔCACC", format="%+.1f",
                                                             help="points: percentage points of the rate")}
st.caption("Top critical heads: the five whose ablation moves ΔASR unknown most (largest |ΔASR unknown|), in points.")
left, right = st.columns(2)
with left:
    st.markdown(f"**Top critical heads, {S.esc(F.stage_title(after))}**")
    st.dataframe(R.critical_heads(view, after), hide_index=True, key="heads_top_after", width="stretch",
                 column_config=critical)
with right:
    st.markdown(f"**Top critical heads, {S.esc(F.stage_title(before))}**")
    st.dataframe(R.critical_heads(view, before), hide_index=True, key="heads_top_before", width="stretch",
                 column_config=critical)
