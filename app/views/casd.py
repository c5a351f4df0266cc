"""CASD: how alike the changes that the trainings made to the victim are, as a matrix, with its CSV.

Read from the run's analysis (``analysis.json``'s ``casd`` block, loaded by RunView). The trainings
shown are kept in the URL (?show=), so a link restores the view.
"""

import numpy as np
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F
from locphylax_core.registry import DEFENSES

MEANING = {
    "cosine": "0 means the two trainings pushed every layer in the same direction, 1 unrelated directions, "
              "2 opposite directions; how far they pushed does not count.",
    "l1": "0 means the two trainings shifted every layer identically; up to 2 as their shifts differ, in "
          "direction or in size (normalised per layer).",
}


def training_label(key: str) -> str:
    """A CASD row's name for a person: Locphylax's stages, or the baseline's registry label."""
    return {"stage1": "Locphylax Stage 1", "stage2": "Locphylax Stage 2"}.get(key) or DEFENSES.label(key)


def restore_shown(options: list[str]) -> None:
    """The trainings chosen: ?show= the first time this session opens the page (a shared link), else
    the user's last choice; names this run does not have are left out, with a note."""
    key = "casd_show"
    if key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]
        return
    asked = [v for v in st.query_params.get_all("show") if v]
    kept = [v for v in asked if v in options]
    if len(kept) < len(asked):
        unknown = ", ".join(S.code(v) for v in asked if v not in options)
        st.info(f"The link names trainings that this run's CASD does not have ({unknown}): "
                + ("left out." if kept else "showing them all instead."))
    st.session_state[key] = kept if kept else list(options)


st.title("CASD")
view = S.pick_run(need_analysis=True)
if view is None or not view.analysed:
    st.stop()
casd = view.analysis.get("casd")
if not casd and not view.analysis.get("complete", True):  # a running analysis writes each part as it finishes
    st.info(f"The CASD of run {S.code(view.run_id)} is still being computed; it appears here when written.")
    st.stop()
if not casd and R.analysis_left_out(view, "casd"):
    st.info(f"Run {S.code(view.run_id)} has no CASD: its config leaves it out (`eval.analyses`, as the live preset "
            f"does). {S.code('locphylax analyze ' + view.run_id + ' --all', None)} computes it.")
    st.stop()
if not casd:
    st.info(f"Run {S.code(view.run_id)} has no CASD: its analysis was run without it (`--no-casd`), or the run has "
            "no training besides the victim.")
    st.stop()
try:
    labels = [str(x) for x in casd["labels"]]
    matrix = np.asarray(casd["matrix"], dtype=float)  # None (not finite when stored) reads as NaN
    metric = str(casd.get("metric", "cosine"))
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"a {matrix.shape} matrix for {len(labels)} trainings")
except (KeyError, TypeError, ValueError) as e:
    st.error(f"The CASD block of run {S.code(view.run_id)}'s analysis.json cannot be read: {S.esc(e, 600)}")
    st.stop()

st.write("**CASD** (cross activation shift distance) compares what two trainings did to the victim. For each "
         "training, take how much it moved the mean activation of every layer on the probe prompts (its *shift*); "
         f"CASD is the {S.esc(metric)} distance between two trainings' shifts, averaged over the layers. "
         + MEANING.get(metric, "0 means the two trainings changed the model the same way."))
restore_shown(labels)
shown = st.multiselect("Trainings", labels, format_func=training_label, key="casd_show")
st.query_params["show"] = shown or ""
if not shown:
    st.info("Choose at least one training to show.")
    st.stop()
pick = [labels.index(k) for k in shown]
st.plotly_chart(F.casd_figure([training_label(k) for k in shown], matrix[np.ix_(pick, pick)], metric),
                key="casd_fig")
norms = casd.get("shifts_norm") or {}
if norms:
    st.caption("Size of each training's shift (norm over all layers; the cosine CASD ignores it): "
               + ", ".join(f"{S.esc(training_label(k))} {norms[k]:.2f}" for k in shown
                           if isinstance(norms.get(k), (int, float))) + ".")
st.download_button("casd.csv", data=F.casd_table(labels, matrix).to_csv().encode(),
                   file_name=f"{view.run_id}_casd.csv", mime="text/csv", key="casd_csv",
                   help="The whole matrix, every training, as stored in the run's analysis.json.")
