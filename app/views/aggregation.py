"""Aggregation: the probe set's final-layer states projected to 2-D at every stage."""

import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F

st.title("Aggregation")
st.write("Each point is one probe sentence, placed by its final-layer hidden state at the last prompt token. "
         "All stages share one projection, so movement between stages is real movement.")
view = S.pick_run(need_analysis=True)
if view is None or not view.analysed:
    st.stop()

methods = [m for m in ("pca", "tsne", "umap") if m in (view.analysis.get("projections") or {})]
if not methods:
    st.warning("This run's analysis has no projections.")
    st.stop()
c = st.columns([1, 2, 2])
method = c[0].radio("Projection", methods, index=methods.index("tsne") if "tsne" in methods else 0,
                    format_func=str.upper, horizontal=True, key="agg_method")
try:
    coords, preds = S.projection(view, method)
except (OSError, KeyError, ValueError) as e:
    st.error(f"The {method} projection of this run cannot be read: {e}")
    st.stop()
stages = list(coords)
stage = c[1].select_slider("Stage", stages, value="stage1" if "stage1" in stages else stages[0],
                           format_func=F.stage_title, key="agg_stage")
groups_all = list(dict.fromkeys(r["group"] for r in view.probe))
groups = c[2].multiselect("Groups", groups_all, default=groups_all, key="agg_groups")

left, right = st.columns([3, 1])
with left:
    st.plotly_chart(F.projection_figure(coords, list(view.probe), preds, view.label_words, method,
                                        groups=groups, active=stage), key="agg_fig")
    st.caption("The slider and ▶ Play under the plot animate through the stages; hover a point for its text "
               "and the model's answer.")
with right:
    m = (view.analysis.get("aggregation") or {}).get(stage) or {}
    st.markdown(f"**{F.stage_title(stage)}**")
    score = m.get("aggregation_score")
    st.metric("aggregation score", "n/a" if score is None else f"{score:.3f}",
              help="how much closer unknown-trigger states sit to the known triggers than to clean states "
                   "with the same answer (docs/analysis.md); 1 = fully gathered")
    for k, label in (("unknown_nearest_known", "unknown's nearest neighbour is a known trigger"),
                     ("unknown_nearest_known_same_pred", "the same, among equal answers"),
                     ("silhouette", "silhouette"), ("davies_bouldin", "Davies–Bouldin")):
        if isinstance(m.get(k), (int, float)):
            st.metric(label, f"{m[k]:.3f}")
    for pair, dist in (m.get("centroid_distance") or {}).items():
        st.caption(f"centroid distance {pair}: {dist:.2f}")
table = R.aggregation_table(view)
if not table.empty:
    with st.expander("Every aggregation metric, every stage"):
        st.dataframe(table, hide_index=True, key="agg_table")
