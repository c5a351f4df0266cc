"""Aggregation: the probe set's final-layer states projected to 2-D at every stage.

The stage is chosen only by the Stage slider on this page (the figure has no Play button or slider
of its own, which could show another stage than the one the metrics describe). The projection,
stage and groups are kept in the URL (?proj=, ?stage=, ?groups=), so a link restores the view.
"""

import numpy as np
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F


def why_no_score(groups: list[str], pred: np.ndarray | None, words: list[str]) -> str:
    """Why ``aggregation_score`` is undefined at a stage, in the terms of
    ``analysis.metrics.aggregation_metrics``: it compares the unknown-trigger inputs only with clean
    and known-trigger inputs that got the SAME answer, so an answer that no clean input (or no
    known-trigger input) gets leaves nothing to compare with."""
    head = ("n/a: the score compares the hidden-trigger inputs only with clean inputs and defender-trigger "
            "inputs that got the same answer")
    groups_arr = np.asarray(groups, dtype=object)
    unknown = groups_arr == "unknown"
    if not unknown.any():
        return head + "; this probe set has no hidden-trigger input."
    if pred is None or len(pred) != len(groups_arr):
        return head + "; this stage has no stored answers to match them by."
    clean = np.array([g.startswith("clean:") for g in groups], bool)
    known = np.array([g.startswith("known:") for g in groups], bool)
    reasons = []
    for p in np.unique(pred[unknown]):
        word = f"“{words[p]}”" if 0 <= p < len(words) else f"answer {p}"
        n = int((pred[unknown] == p).sum())
        if not (clean & (pred == p)).any():
            reasons.append(f"{n} get {word}, which no clean input gets")
        elif not (known & (pred == p)).any():
            reasons.append(f"{n} get {word}, which no defender-trigger input gets")
        else:
            reasons.append(f"{n} get {word}, where the clean and defender-trigger inputs sit at one place")
    return head + ". Here, of the hidden-trigger inputs, " + "; ".join(reasons) + "."


st.title("Aggregation")
st.write("Each point is one probe sentence, placed by its final-layer hidden state at the last prompt token. "
         "All stages share one projection, so movement between stages is real movement.")
view = S.pick_run(need_analysis=True)
if view is None or not view.analysed:
    st.stop()

methods = [m for m in ("pca", "tsne", "umap") if m in (view.analysis.get("projections") or {})]
if not methods:
    if view.analysis.get("complete", True):
        st.warning("This run's analysis has no projections.")
    else:  # a running analysis writes each part as it finishes
        st.info("The projections of this run are still being computed; they appear here when written.")
    st.stop()
S.restore_from_link("agg_method", "proj", methods, "tsne" if "tsne" in methods else methods[0], "projection",
                    name=str.upper)
c = st.columns([1, 2, 2])
method = c[0].radio("Projection", methods, format_func=str.upper, horizontal=True, key="agg_method")
try:
    coords, preds = S.projection(view, method)
except (OSError, KeyError, ValueError) as e:
    st.error(f"The {method} projection of this run cannot be read: {e}")
    st.stop()
stages = list(coords)
S.restore_from_link("agg_stage", "stage", stages, "stage1" if "stage1" in stages else stages[0], "stage",
                    name=F.stage_title)
stage = c[1].select_slider("Stage", stages, format_func=F.stage_title, key="agg_stage")
groups_all = list(dict.fromkeys(r["group"] for r in view.probe))
S.restore_from_link("agg_groups", "groups", groups_all, groups_all, "groups", many=True)
groups = c[2].multiselect("Groups", groups_all, key="agg_groups")
st.query_params.update({"proj": method, "stage": stage, "groups": groups or ""})

left, right = st.columns([3, 1])
with left:
    if not groups:
        st.info("Choose at least one group to draw.")
    else:
        st.plotly_chart(F.projection_figure(coords, list(view.probe), preds, view.label_words, method,
                                            groups=groups, active=stage, animate=False), key="agg_fig")
        st.caption("Move the **Stage** slider above to change the stage; hover a point for its text and the "
                   "model's answer.")
with right:
    m = (view.analysis.get("aggregation") or {}).get(stage) or {}
    st.markdown(f"**{F.stage_title(stage)}**")
    score = m.get("aggregation_score")
    st.metric("aggregation score", "n/a" if score is None else f"{score:.3f}",
              help="How much closer the hidden-trigger states sit to a defender trigger's than to clean states "
                   "with the same answer (docs/analysis.md): 1 = on a defender trigger, 0 = no closer to it.")
    if score is None:
        st.caption(why_no_score([r["group"] for r in view.probe], preds.get(stage), view.label_words))
    short = {"unknown_nearest_known": ("nearest is known", "Share of hidden-trigger inputs whose nearest group "
                                       "centre is a defender trigger's (any answer).", True),
             "unknown_nearest_known_same_pred": ("nearest, same answer", "The same share, counting only group "
                                                 "centres of inputs with the same answer.", True),
             "silhouette": ("silhouette", "Separation of triggered inputs (hidden and defender triggers) from "
                            "clean ones: 1 apart, 0 mixed.", False),
             "davies_bouldin": ("Davies–Bouldin", "Triggered against clean inputs: lower means better separated.",
                                False)}
    for k, (label, help_text, share) in short.items():
        if isinstance(m.get(k), (int, float)):
            st.metric(label, f"{100 * m[k]:.0f}%" if share else f"{m[k]:.2f}", help=help_text)
    for pair, dist in (m.get("centroid_distance") or {}).items():
        st.caption(f"centroid distance {pair.replace('->', ' → ')}: {dist:.2f}")
table = R.aggregation_table(view)
if not table.empty:
    with st.expander("Every aggregation metric, every stage"):
        st.dataframe(table, hide_index=True, key="agg_table")
