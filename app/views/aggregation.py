"""Aggregation: the probe set's final-layer states projected to 2-D at every stage.

The stage is chosen only by the Stage slider on this page (the figure has no Play button or slider
of its own, which could show another stage than the one the metrics describe). Side by side, one
slider drives both panels: a range of two stages of this run, or one stage of this run and of
another. Points picked in a plot (click, box or lasso) and the hits of a text search go into one
table; a row of it opens the per-input inspector (each stage's answer and probability, which words
decide it, the defender's detector). The view is kept in the URL (?proj=, ?stage=, ?groups=,
?side=, ?stages=, ?other=, ?q=, ?point=), so a link restores it.
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
        word = f"“{S.esc(words[p])}”" if 0 <= p < len(words) else f"answer {S.esc(p)}"
        n = int((pred[unknown] == p).sum())
        if not (clean & (pred == p)).any():
            reasons.append(f"{n} get {word}, which no clean input gets")
        elif not (known & (pred == p)).any():
            reasons.append(f"{n} get {word}, which no defender-trigger input gets")
        else:
            reasons.append(f"{n} get {word}, where the clean and defender-trigger inputs sit at one place")
    return head + ". Here, of the hidden-trigger inputs, " + "; ".join(reasons) + "."


SIDES = {"one": "one view", "stages": "two stages", "runs": "two runs"}


def picked(chart_key: str) -> list[int]:
    """Probe indices of the points selected in a projection chart (customdata[3] of each point)."""
    state = st.session_state.get(chart_key) or {}
    out = []
    for p in (state.get("selection") or {}).get("points") or []:
        cell = p.get("customdata")
        if isinstance(cell, (list, tuple)) and len(cell) >= 4:
            try:
                out.append(int(cell[3]))
            except (TypeError, ValueError):
                continue
    return out


def start_of_stage_pair(stages: list[str]) -> tuple[str, str]:
    """The two-stage slider's starting value: ?stages=a&stages=b the first time, else the default
    (the slider keeps the user's later choices itself). It is passed as the widget's value, which is
    also what makes Streamlit read the slider as a range."""
    key = "agg_pair"
    default = ("victim", "stage2") if {"victim", "stage2"} <= set(stages) else (stages[0], stages[-1])
    if key in st.session_state:
        if not all(v in stages for v in st.session_state[key]):
            del st.session_state[key]  # a run with other stages
        return default
    asked = [v for v in st.query_params.get_all("stages") if v]
    if asked and (len(asked) != 2 or not all(v in stages for v in asked)):
        st.info(f"The link's stages ({', '.join(S.code(v) for v in asked)}) are not two stages of this run; "
                f"showing {S.esc(F.stage_title(default[0]))} and {S.esc(F.stage_title(default[1]))} instead.")
        asked = []
    return tuple(asked) if asked else default


def draw(view: R.RunView, coords, preds, stage: str, key: str, marked, title: str | None = None) -> None:
    """One projection panel at ``stage`` whose points can be picked (click, box, lasso)."""
    st.plotly_chart(F.projection_figure(coords, list(view.probe), preds, view.label_words, method, groups=groups,
                                        active=stage, animate=False, marked=marked, title=title),
                    key=key, on_select="rerun", selection_mode=("points", "box", "lasso"))


def metrics_panel(view: R.RunView, stage: str, preds) -> None:
    m = (view.analysis.get("aggregation") or {}).get(stage) or {}
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
        st.caption(f"centroid distance {S.esc(str(pair).replace('->', ' → '))}: {S.esc(dist)}")


def other_run(view: R.RunView, method: str):
    """The second run of a two-run view, chosen among the other runs (URL ?other=)."""
    ids = [r["run_id"] for r in S.all_runs() if r["run_id"] != view.run_id]
    if not ids:
        st.info("The run store holds no other run to set beside this one.")
        return None
    S.restore_from_link("agg_other", "other", ids, ids[0], "run", where="in this run store")
    rid = st.selectbox("Beside it", ids, key="agg_other")
    st.query_params["other"] = rid
    other = S.load_view(S.runs_root() / rid)
    if not other.analysed or method not in (other.analysis.get("projections") or {}):
        st.warning(f"Run {S.code(rid)} has no {S.esc(method.upper())} projection to set beside this one.")
        return None
    return other


def inspector(view: R.RunView, index: int, stages: list[str]) -> None:
    """One probe input: its text (trigger marked), group, each stage's answer with its probability,
    the words that decide it, and the defender's detector."""
    row = view.probe[index]
    st.markdown(f"**Input {index}** ({S.esc(row['group'])}, correct answer *{S.esc(view.label_words[int(row['label'])])}*): "
                + S.trigger_marked(row["text"], view.attack_trigger or ""), unsafe_allow_html=True)
    with_model = R.stages_with_model(view)
    asked = [k for k in dict.fromkeys(["victim", "stage1", "stage2", *stages]) if k in with_model]
    if not asked:
        st.info("This run stores no stage checkpoint, so its models cannot answer this input here.")
        return
    S.input_report(view, row["text"], asked, salience=list(dict.fromkeys(
        [k for k in ("victim", *stages[-1:]) if k in asked])))


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
S.restore_from_link("agg_side", "side", list(SIDES), "one", "side-by-side view", name=SIDES.get)
c = st.columns([1, 1, 2, 2])
method = c[0].radio("Projection", methods, format_func=str.upper, horizontal=True, key="agg_method")
side = c[1].radio("Side by side", list(SIDES), format_func=SIDES.get, key="agg_side")
try:
    coords, preds = S.projection(view, method)
except (OSError, KeyError, ValueError) as e:
    st.error(f"The {S.esc(method)} projection of this run cannot be read: {S.esc(e, 600)}")
    st.stop()
stages = list(coords)
other = None
if side == "runs":
    with c[3]:
        other = other_run(view, method)
if other is not None:
    o_coords, o_preds = S.projection(other, method)
    shared = [k for k in stages if k in o_coords]
    if not shared:
        st.warning(f"Runs {S.code(view.run_id)} and {S.code(other.run_id)} have no analysed stage in common.")
        st.stop()
else:
    shared = stages
if side == "stages" and len(stages) > 1:
    pair = tuple(c[2].select_slider("Stages", stages, value=start_of_stage_pair(stages), format_func=F.stage_title,
                                    key="agg_pair"))
    shown = list(dict.fromkeys(pair))
    st.query_params["stages"] = list(pair)
else:
    S.restore_from_link("agg_stage", "stage", shared, "stage1" if "stage1" in shared else shared[0], "stage",
                        name=F.stage_title)
    shown = [c[2].select_slider("Stage", shared, format_func=F.stage_title, key="agg_stage")]
    st.query_params["stage"] = shown[0]
groups_all = list(dict.fromkeys(r["group"] for r in view.probe))
S.restore_from_link("agg_groups", "groups", groups_all, groups_all, "groups", many=True)
groups = (c[3] if side != "runs" else c[2]).multiselect("Groups", groups_all, key="agg_groups")
st.session_state.setdefault("agg_q", st.query_params.get("q", ""))
query = st.text_input("Find probe inputs", key="agg_q", placeholder="words of the sentence, e.g. a trigger you suspect")
found = R.probe_search(view, query)
st.query_params.update({"proj": method, "side": side, "groups": groups or "", "q": query})
for param, used in (("stages", side == "stages"), ("other", side == "runs")):
    if not used and param in st.query_params:
        del st.query_params[param]

if not groups:
    st.info("Choose at least one group to draw.")
    st.stop()
marked = found if query.strip() else None
if other is not None:
    left, right = st.columns(2)
    with left:
        draw(view, coords, preds, shown[0], "agg_fig", marked, title=f"{view.run_id}: {F.stage_title(shown[0])}")
    with right:
        draw(other, o_coords, o_preds, shown[0], "agg_fig_other", R.probe_search(other, query) if query.strip()
             else None, title=f"{other.run_id}: {F.stage_title(shown[0])}")
    st.caption("The **Stage** slider moves both runs. Each run has its own projection, so compare the "
               "arrangement of the groups, not positions across the two plots.")
elif len(shown) == 2:
    panels = st.columns(2)
    for col, k, key in zip(panels, shown, ("agg_fig", "agg_fig_b")):
        with col:
            draw(view, coords, preds, k, key, marked, title=f"{F.stage_title(k)}")
            metrics_panel(view, k, preds)
    st.caption("Both ends of the **Stages** slider pick a stage; both plots share one projection, so a point "
               "that moves between them moved in the model.")
else:
    left, right = st.columns([3, 1])
    with left:
        draw(view, coords, preds, shown[0], "agg_fig", marked)
        st.caption("Move the **Stage** slider above to change the stage; hover a point for its text and the "
                   "model's answer; click, box or lasso points to list them below.")
    with right:
        st.markdown(f"**{S.esc(F.stage_title(shown[0]))}**")
        metrics_panel(view, shown[0], preds)

# the points picked in this run's plots and the search's hits, one table; a row opens the inspector
chosen = picked("agg_fig") + (picked("agg_fig_b") if len(shown) == 2 else [])
if query.strip() and not found:
    st.info(f"No probe input of this run contains “{S.esc(query.strip())}”.")
listed = list(dict.fromkeys(chosen + found))
linked_point = st.query_params.get("point")
if linked_point is not None and "agg_point" not in st.session_state:
    if linked_point.isdigit() and int(linked_point) < len(view.probe):
        st.session_state["agg_point"] = int(linked_point)
    else:
        st.info(f"The link's input {S.code(linked_point)} is not a probe input of this run (0 to {len(view.probe) - 1}).")
        st.session_state["agg_point"] = None
if listed:
    st.markdown(f"**{len(listed)} inputs** (" + ", ".join(
        p for p, n in (("picked in the plot", len(chosen)), ("found by the search", len(found))) if n) + ")")
    table = R.probe_rows(view, listed, preds, shown)
    st.dataframe(table.rename(columns={k: F.stage_title(k) for k in shown}), hide_index=True, key="agg_rows",
                 on_select="rerun", selection_mode="single-row", width="stretch",
                 column_config={"text": st.column_config.TextColumn("text", width="large")})
    rows = ((st.session_state.get("agg_rows") or {}).get("selection") or {}).get("rows") or []
    if rows and rows[0] < len(table):
        st.session_state["agg_point"] = int(table.iloc[rows[0]]["index"])
    st.caption("Pick a row to inspect that input.")
point = st.session_state.get("agg_point")
if point is not None and 0 <= point < len(view.probe):
    st.query_params["point"] = str(point)
    st.subheader("Inspector")
    inspector(view, point, shown)
elif "point" in st.query_params:
    del st.query_params["point"]

table = R.aggregation_table(view)
if not table.empty:
    with st.expander("Every aggregation metric, every stage"):
        st.dataframe(table, hide_index=True, key="agg_table")
