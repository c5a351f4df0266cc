"""Instructor mode: one button runs the live demo end to end; each plot gets one plain sentence."""

import numpy as np
import streamlit as st

import support as S
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F

st.title("Backdoor collapse, live")
st.write("A small language model is trained to judge sentiment, then secretly backdoored: a hidden "
         "trigger word makes it answer *positive* whatever the sentence says. The defender does not "
         "know the trigger. Locphylax plants two triggers of its own (Stage 1), pulls every triggered "
         "input into one region of the model's final layer, then overwrites that region (Stage 2).")


def latest_demo() -> R.RunView | None:
    for r in S.all_runs():
        if r["preset"] == "demo" and r["status"] == "done":
            view = S.load_view(r["path"])
            if view.analysed:
                return view
    return None


live = [j for j in S.live_jobs() if j.run_id.split("-")[2:3] == ["demo"]]
demo = latest_demo()
c1, c2 = st.columns([1, 3])
start = c1.button("▶ Run the live demo", type="primary", disabled=bool(live),
                  help="Trains the victim and runs the defense and its baselines in a separate process "
                       "(about 3 minutes on 2 CPU cores, then 90 s of analyses).")
if start:
    S.start_job(S.preset_config("demo"))
    st.rerun()
if demo is None and not live:
    c2.info("No demo run is stored yet: one click on **Run the live demo** computes it, with progress here.")


@st.fragment(run_every=2.0)  # a live view costs CPU that the job on a small machine needs
def progress(run_id: str) -> None:
    status = S.job_panel(run_id, key="demo", caption=(
        "The red line is how often the hidden trigger still works. It stays near 100% while the backdoor "
        "is planted, and falls when the defense starts."))
    if not status.live:
        st.rerun(scope="app")


if live:
    st.subheader("Running now")
    progress(live[0].run_id)

if demo is not None:
    s = demo.summary or {}
    stages, base = s.get("stages", {}), s.get("baselines", {})
    v_asr = stages.get("victim", {}).get("asr", {}).get("unknown")
    s1_asr = stages.get("stage1", {}).get("asr", {}).get("unknown")
    s2_asr = stages.get("stage2", {}).get("asr", {}).get("unknown")
    ft_asr = base.get("clean_ft", {}).get("asr", {}).get("unknown")
    st.subheader(f"Result of run `{demo.run_id}`")
    m = st.columns(4)
    m[0].metric("Hidden trigger works, victim", S.fmt_pct(v_asr))
    m[1].metric("after Stage 1", S.fmt_pct(s1_asr))
    m[2].metric("after Stage 2 (Locphylax)", S.fmt_pct(s2_asr),
                delta=None if v_asr is None or s2_asr is None else f"{100 * (s2_asr - v_asr):+.1f} points",
                delta_color="inverse")
    m[3].metric("plain clean fine-tuning", S.fmt_pct(ft_asr))
    cacc_v, cacc_2 = stages.get("victim", {}).get("cacc"), stages.get("stage2", {}).get("cacc")
    st.markdown(f"**In one sentence:** the hidden trigger fooled the victim on {S.fmt_pct(v_asr)} of the "
                f"sentences; after the defense it fools it on {S.fmt_pct(s2_asr)}, while ordinary accuracy "
                f"went from {S.fmt_pct(cacc_v)} to {S.fmt_pct(cacc_2)}. Plain fine-tuning on the same clean "
                f"data leaves it at {S.fmt_pct(ft_asr)}.")

    st.markdown("#### 1. The curves")
    st.caption(f"Watch the red line, the hidden trigger's success rate: {S.fmt_pct(v_asr)} once the backdoor "
               f"is planted, {S.fmt_pct(s1_asr)} at the end of Stage 1 and {S.fmt_pct(s2_asr)} after Stage 2, "
               f"while the blue line (clean accuracy) ends at {S.fmt_pct(cacc_2)}.")
    st.plotly_chart(F.curves_figure(R.curve_rows(demo), ["locphylax"]), key="demo-curves")

    st.markdown("#### 2. Where the triggered sentences sit inside the model")
    methods = list((demo.analysis or {}).get("projections", {}))
    if methods:
        method = "tsne" if "tsne" in methods else methods[0]
        coords, preds = S.projection(demo, method)
        stage_keys = [k for k in ("victim", "stage1", "stage2") if k in coords]
        stage = st.select_slider("Stage", stage_keys, value=stage_keys[min(1, len(stage_keys) - 1)],
                                 format_func=F.stage_title, key="demo-stage")
        agg = (demo.analysis or {}).get("aggregation") or {}

        def to_known(k):  # the unknown trigger's distance to the nearest known trigger's centroid
            d = (agg.get(k) or {}).get("centroid_distance") or {}
            vals = [v for pair, v in d.items() if pair.startswith("unknown->known")]
            return min(vals) if vals else None
        d_v, d_1 = to_known("victim"), to_known("stage1")
        moved = ("" if d_v is None or d_1 is None else
                 f" From the victim to Stage 1 their distance to the defender's nearest trigger group went "
                 f"from {d_v:.1f} to {d_1:.1f}.")
        st.caption("Each dot is one sentence. Red diamonds carry the hidden trigger, orange and yellow the "
                   "defender's own triggers; move the slider to see them gather." + moved)
        # one stage per draw (the slider above picks it): a third of the data of an animated figure,
        # which keeps this three-chart page quick to draw; the Aggregation page has the animation
        st.plotly_chart(F.projection_figure({stage: coords[stage]}, list(demo.probe), preds,
                                            demo.label_words, method), key="demo-projection")

    ha = (demo.analysis or {}).get("head_ablation") or {}
    if "victim" in ha and "stage2" in ha:
        st.markdown("#### 3. Which attention heads carried the backdoor")
        before = R.head_grids(demo, "victim")["delta_asr_unknown"]
        after = R.head_grids(demo, "stage2")["delta_asr_unknown"]
        def strongest(grid):
            finite = np.where(np.isfinite(grid), np.abs(grid), -1)
            layer, head = np.unravel_index(int(np.argmax(finite)), grid.shape)
            return layer, head, grid[layer, head]
        lv, hv, dv = strongest(before)
        la, hd, da = strongest(after)
        st.caption(f"Each square is one attention head; blue means switching it off lowers the hidden trigger's "
                   f"success. In the victim, head L{lv}.h{hv} matters most ({100 * dv:+.0f} points); after the "
                   f"defense the strongest head, L{la}.h{hd}, moves it by {100 * da:+.0f} points.")
        st.plotly_chart(F.head_heatmaps(before, after), key="demo-heads")

    st.markdown("#### 4. Try it yourself")
    trigger = demo.attack_trigger or ""
    text = st.text_input("A sentence (add the hidden trigger to see the backdoor)",
                         value=f"the plot was dull and the acting was awful {trigger}", key="demo-try")
    if text.strip():
        stages_avail = [k for k in ("victim", "stage1", "stage2") if k in demo.finished]
        answers = {k: S.answer(demo, k, [text])[0] for k in stages_avail}
        st.table({"stage": [F.stage_title(k) for k in answers], "answer": list(answers.values())})
