"""Layers: where the backdoor is computed, before and after a defense.

The logit lens (after each block, the probability of the attacker's target and of the correct
answer) and the activation-patching maps (how much of the clean answer patching one site of the
clean run into the triggered run restores: residual stream per layer x token role, and per head),
for two stages side by side with their difference; the salience and localisation rates; the
attention patterns of a typed sentence. Stages are kept in the URL (?before=, ?after=).
"""

import numpy as np
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F

st.title("Layers")
view = S.pick_run(need_analysis=True)
if view is None or not view.analysed:
    st.stop()
stages = R.layer_stages(view)
if not stages:
    loc = R.localisation_summary(view) or {}
    if not view.analysis.get("complete", True):
        st.info(f"The layer analyses of run {S.code(view.run_id)} are still being computed; they appear here when written.")
    elif R.analysis_left_out(view, "layers"):
        st.info(f"Run {S.code(view.run_id)} has no layer analyses: its config leaves them out (`eval.analyses`, as the "
                f"live preset does). {S.code('locphylax analyze ' + view.run_id + ' --all', None)} computes them.")
    else:
        st.info(f"Run {S.code(view.run_id)} has no layer analyses"
                + (f": {S.esc(loc['reason'], 600)}." if loc.get("reason") else " (analysed before they existed: run "
                   "`locphylax analyze` again)."))
    st.stop()

st.write("Where does the backdoor's answer appear, and which sites carry it? **Logit lens**: after each block, "
         "the model's final norm and unembedding read the answer position. **Activation patching**: one site at "
         "a time, the clean sentence's activation replaces the triggered one's; 1 means that site alone carries "
         "the trigger's effect on the answer, 0 that it carries none. A defense that *removes* the backdoor "
         "empties the maps; one that *suppresses* it leaves the early sites lit and cuts the path later.")
S.restore_from_link("layers_before", "before", stages, "victim" if "victim" in stages else stages[0], "stage")
S.restore_from_link("layers_after", "after", stages, "stage2" if "stage2" in stages else stages[-1], "stage")
c1, c2 = st.columns(2)
before = c1.selectbox("Before", stages, format_func=F.stage_title, key="layers_before")
after = c2.selectbox("After", stages, format_func=F.stage_title, key="layers_after")
st.query_params["before"], st.query_params["after"] = before, after
a, b = R.layer_maps(view, before), R.layer_maps(view, after)

st.subheader("Logit lens")
st.plotly_chart(F.logit_lens_figure({before: a["lens"], after: b["lens"]}), key="layers_lens")
st.subheader("Activation patching: residual stream")
st.caption("Rows: the input of each block (L0 = the embeddings). Columns: the tokens of one role in the "
           "triggered prompt.")
st.plotly_chart(F.patching_heatmaps(a["residual"], b["residual"], before, after, x_labels=a["roles"]),
                key="layers_resid")
st.subheader("Activation patching: attention heads")
st.plotly_chart(F.patching_heatmaps(a["heads"], b["heads"], before, after), key="layers_heads")
ld = {k: R.layer_maps(view, k)["logit_diff"] for k in (before, after)}
st.caption("Logit difference target - correct at the answer position (triggered / clean): "
           + "; ".join(f"{S.esc(F.stage_title(k))} {v.get('triggered', float('nan')):+.2f} / {v.get('clean', float('nan')):+.2f}"
                       for k, v in ld.items()) + ". Restoration is undefined where the two are equal.")
pd_table = F.patching_table({f"{before} residual": a["residual"], f"{after} residual": b["residual"]},
                                    a["roles"])
st.download_button("patching.csv", data=pd_table.to_csv(index=False).encode(), file_name=f"{view.run_id}_patching.csv",
                   mime="text/csv", key="layers_csv")

st.subheader("Which word fires it")
sal = R.salience_table(view)
if len(sal):
    st.write("Share of triggered probe inputs whose most salient word (toward the attacker's target) is the "
             "trigger, per stage:")
    st.dataframe(sal.assign(stage=[F.stage_title(k) for k in sal["stage"]]), hide_index=True, key="layers_sal")
loc = R.localisation_summary(view)
if loc and loc.get("available"):
    st.write(f"**The defender's detector** (Stage 1 answers the canary; no trigger given): precision "
             f"{S.fmt_pct(loc.get('precision'))}, recall {S.fmt_pct(loc.get('recall'))} on {S.esc(loc.get('n_clean'))} clean "
             f"and {S.esc(loc.get('n_triggered'))} triggered inputs; the top-ranked word is the trigger on "
             f"{S.fmt_pct(loc.get('trigger_top1_rate'))} of triggered inputs.")
elif loc:
    st.caption(f"Trigger localisation: not available ({S.esc(loc.get('reason'), 600)}).")

st.subheader("Attention patterns")
text = st.text_input("A sentence", key="layers_text",
                     value=(view.analysis.get("salience", {}).get(before, {}).get("examples") or [{}])[0].get("text", ""))
n_layers = int(np.asarray(a["heads"]).shape[0])
layer = st.number_input("Layer", 0, max(0, n_layers - 1), 0, key="layers_layer")
if text.strip() and st.button("Show the attention patterns", key="layers_attn"):
    for k in (before, after):
        r = S.sentence_attention(view, k, text)
        st.plotly_chart(F.attention_figure(r["pattern"][int(layer)], r["tokens"], int(layer)).update_layout(
            title=f"{F.stage_title(k)}: attention, layer {int(layer)}"), key=f"layers_attn_{k}")
