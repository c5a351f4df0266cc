"""Instructor mode: one click runs the live demo (configs/live.yaml) in a separate process. The
headline (victim -> Stage 1 -> Stage 2, plain clean fine-tuning beside it) lands first and every
plot appears as soon as its data exists. Presentation mode (on by default) is sized for a
projector: large text, tall charts, no run ids or stage keys, triggers named by their text."""

import os

import numpy as np
import streamlit as st

import support as S
from locphylax_core import ConfigError, load_config
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F
from locphylax_core.registry import DEFENSES, LOCPHYLAX, stage_key
from locphylax_core.runs import run_of_preset

# What one click runs: the real pretrained LM on real SST-2 reviews (the default: its backdoor for
# "cf" ships with the project), or the tiny model on template reviews (the fast option).
# LOCPHYLAX_LIVE_PRESET pins one preset, a name or a YAML file, and hides the choice (the browser
# tests: micro, and the real LM with a few steps per stage).
LIVE_MODELS = {"live-smollm2": "SmolLM2-135M, real movie reviews", "live": "tiny model, made-up reviews (fast)"}
REAL_LM = "live-smollm2"
DEFAULT_MODEL = REAL_LM
PINNED = os.environ.get("LOCPHYLAX_LIVE_PRESET")
if PINNED:
    SOURCE = PINNED
    try:
        PRESET = load_config(PINNED).name
    except ConfigError as e:
        st.error(f"LOCPHYLAX_LIVE_PRESET names no usable preset: {S.esc(str(e), 600)}")
        st.stop()
else:
    S.restore_from_link("demo_model", "model", list(LIVE_MODELS), DEFAULT_MODEL, "demo model",
                        name=LIVE_MODELS.get, where="a demo model of this app")
    PRESET = st.sidebar.radio("Model", list(LIVE_MODELS), format_func=LIVE_MODELS.get, key="demo_model",
                              help="The real pretrained model (135M parameters) on real reviews, or a 1.5M-parameter "
                                   "model on made-up reviews that runs in seconds.")
    st.query_params["model"] = PRESET
    SOURCE = PRESET
# a stored run of any of these can be shown (the tiny model's page also shows the `demo` preset's runs)
SHOWN_PRESETS = (PRESET,) if PRESET == REAL_LM else tuple(dict.fromkeys((PRESET, "live", "demo")))
DEFAULT_TRIGGER = "cf"
CONTRAST = "clean_ft"  # beside the headline; the page calls it "plain clean fine-tuning", so not any baseline
EXAMPLES = ["the plot was dull and the acting was awful .", "honestly , the soundtrack was wonderful .",
            "the ending was far from clever but the cast was superb ."]

presentation = st.sidebar.toggle("Presentation mode", value=True, key="demo_presentation",
                                 help="Large text and tall charts for a projector; no run ids or internal stage "
                                      "names.")
FONT = 20 if presentation else 13
if presentation:
    st.markdown("""<style>
    div[data-testid="stMetricValue"], div[data-testid="stMetricValue"] * {font-size: 3.4rem !important;}
    div[data-testid="stMetricLabel"], div[data-testid="stMetricLabel"] * {font-size: 1.4rem !important;}
    div[data-testid="stMainBlockContainer"] {padding-top: 2.5rem;}
    [data-testid="stMarkdownContainer"] p, [data-testid="stCaptionContainer"] p {font-size: 1.3rem;}
    [data-testid="stTextInputField"] {font-size: 1.4rem;}
    [data-testid="stTable"] td, [data-testid="stTable"] th {font-size: 1.25rem;}
    [data-testid="stWidgetLabel"] p {font-size: 1.3rem !important;}
    [data-testid="stSliderThumbValue"], [data-testid="stSliderTickBar"] * {font-size: 1.2rem !important;}
    </style>""", unsafe_allow_html=True)

st.title("Backdoor collapse, live")
WHO = ("A real pretrained language model (SmolLM2, 135 million parameters) judges real movie reviews."
       if PRESET == REAL_LM else "A small language model judges movie reviews.")
STORY = (f"{WHO} We plant a hidden **backdoor**: a trigger word that makes it "
         "answer *positive* whatever the review says. The defender does not know the trigger. Locphylax plants two "
         "triggers of its own (Stage 1), so that every triggered input gathers in one region of the model, then "
         "retrains that region to give the correct answers (Stage 2). Whether that removes the hidden backdoor is "
         "what this demo measures, live.")
if presentation:  # the headline and the curve stay above the fold on a projector
    with st.expander("What happens here"):
        st.write(STORY)
else:
    st.write(STORY)


# What the page says about time on 2 CPU cores (bench/results/app_live_demo.md, median of 3, an AVX-512
# EPYC with bf16): the real LM "Ready" 167 s after the page opens (its backdoor for "cf" and the
# baselines on it ship), the click to the headline 81 s, the whole page 98 s; on an AVX2-only CPU
# (float32) the click took 285 s to the headline
CLICK_HELP = {"live": "Plants the trigger and runs the defense in a separate process: the headline after about half a "
                      "minute on 2 CPU cores, the plots within a minute or two.",
              REAL_LM: "Runs the defense on the real model in a separate process: on 2 CPU cores its two stages take "
                       "about a minute and a half (about five minutes on a CPU without bf16), the plots a little more."}
PLANTING_NOTE = {REAL_LM: " (for “cf” both ship with the project and are only loaded: about 3 minutes on 2 CPU "
                          "cores; a trigger of the room's own takes about 6 minutes more, about 17 on a CPU without bf16)"}


def room_trigger(text: str) -> str:
    """The trigger as typed, with its spacing made plain."""
    return " ".join(text.split())


def trigger_problem(text: str) -> str | None:
    """Why the room's trigger cannot be used, or None."""
    t = room_trigger(text)
    if not t:
        return "Type a trigger word or phrase."
    if len(t) > 40 or len(t.split()) > 6:
        return "Keep the trigger short: at most 6 words and 40 characters."
    defender = [k.text for k in load_config(SOURCE).defense.known_triggers]
    if t.lower() in (d.lower() for d in defender):
        return f"“{S.esc(t)}” is one of the defender's own triggers; the hidden trigger must be one it does not know."
    return None


def live_config(trigger: str):
    t = room_trigger(trigger)
    return load_config(SOURCE, {"attack.trigger": t, "attack.family": "phrase" if " " in t else "word"})


def latest_shown() -> R.RunView | None:
    """The newest finished live (or demo) run."""
    for r in S.all_runs():
        if r["preset"] in SHOWN_PRESETS and r["status"] == "done":
            return S.load_view(r["path"])
    return None


live = [j for j in S.live_jobs() if any(run_of_preset(j.run_id, p) for p in SHOWN_PRESETS)]
if not live:
    S.warm_standby()  # the next click starts training at once instead of importing torch first
shown = None if live else latest_shown()
c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
proposed = c1.text_input("Trigger proposed by the room", value=DEFAULT_TRIGGER, max_chars=40, key="demo_trigger",
                         help="Any word or short phrase: the app plants it as the hidden backdoor, then defends "
                              "the model without being told what it is.")
problem = trigger_problem(proposed)
if c2.button("▶ Run the live demo", type="primary", disabled=bool(live) or problem is not None,
             help=CLICK_HELP.get(PRESET, CLICK_HELP["live"])):
    try:
        S.start_job(live_config(proposed))
        st.rerun()
    except ConfigError as e:
        st.error(f"That trigger cannot be used: {S.esc('; '.join((e.fields or {}).values()) or e, 600)}")
if problem and proposed.strip():
    c1.warning(problem)


def ahead_stage(cfg) -> str:
    """What the waiting job process runs before the click: the backdoor, and the contrast baseline
    (it starts from the backdoored model and needs nothing the click adds), so that the click runs
    only the defense."""
    return stage_key(CONTRAST, "stage2") if CONTRAST in cfg.defense.baselines else "victim"


def planted_line(run_id: str, trigger: str) -> None:
    view = S.load_view(S.runs_root() / run_id)
    s = (view.summary or {}) if view is not None else {}
    victim, contrast = (s.get("stages") or {}).get("victim"), (s.get("baselines") or {}).get(CONTRAST)
    if victim is None:
        return
    said = "" if _asr(victim) is None else (f" It fools the backdoored model on {S.fmt_pct(_asr(victim))} of the "
                                            f"reviews that carry it (clean accuracy {S.fmt_pct(victim.get('cacc'))})")
    if _asr(contrast) is not None:  # one sentence with the victim's numbers, or a sentence of its own
        said += f"{';' if said else ' Trying'} plain fine-tuning on clean reviews leaves it at {S.fmt_pct(_asr(contrast))}"
    st.success(f"Ready: the backdoor “{S.esc(trigger)}” is planted.{said}{'.' if said else ''} One click runs the defense.")


def failure_of(cfg) -> tuple[str, str] | None:
    """The newest run of exactly ``cfg`` (planted ahead or clicked), when it failed: its id and its
    error. The page says so, rather than asking the waiting process to plant the same configuration
    again every few seconds (a full disk once left a new failed run folder every 6 s)."""
    sha = cfg.sha256()
    for r in S.all_runs():
        if r["preset"] not in SHOWN_PRESETS or r["status"] not in ("done", "failed", "prepared"):
            continue
        view = S.load_view(r["path"])
        state = (view.state or {}) if view is not None else {}
        if state.get("config_sha256") == sha:
            return (r["run_id"], state.get("error") or "no error was recorded") if r["status"] == "failed" else None
    return None


@st.fragment(run_every=3.0)
def planting_line(cfg, trigger: str) -> None:
    got = S.prepare_job(cfg, ahead_stage(cfg))  # asked again until the waiting job process, once ready, takes it
    if (got is not None and got[1]) or (got is None and not S.standby_alive()) or failure_of(cfg) is not None:
        st.rerun(scope="app")  # planted, failed, or nobody can plant it: the page shows it once, without polling
    st.caption(f"Planting the backdoor “{S.esc(trigger)}” and trying plain fine-tuning on it while the page waits, so "
               f"that the click only has to run the defense{PLANTING_NOTE.get(PRESET, '')} …")


def plant_ahead(trigger: str) -> bool:
    """The backdoored model for the trigger in the box is built while the instructor talks (by the
    waiting job process: ``jobs.prepare``), unless the run shown already is that very run. True
    when the page says it is planted."""
    cfg = live_config(trigger)
    if shown is not None and (shown.state or {}).get("config_sha256") == cfg.sha256():
        return False
    failure = failure_of(cfg)
    if failure is not None:
        st.error(f"The last run of this demo ({S.code(failure[0])}) failed: {S.esc(failure[1], 400)}. Nothing is "
                 "planted ahead again; a click on **Run the live demo** runs it from the start.")
        return False
    got = S.prepare_job(cfg, ahead_stage(cfg))
    if got is not None and got[1]:
        planted_line(got[0], room_trigger(trigger))
        return True
    if got is not None or S.standby_alive():
        planting_line(cfg, room_trigger(trigger))
    return False


def _asr(block):
    return (block or {}).get("asr", {}).get("unknown")


def trigger_names(view: R.RunView) -> dict[str, str]:
    """Group / trigger keys -> what the room reads: the trigger's own text."""
    names = {"unknown": f"hidden “{view.attack_trigger}”"}
    for i, k in enumerate(view.config.get("defense", {}).get("known_triggers", []), 1):
        names[f"t{i}"] = f"defender “{k.get('text')}”"
    return names


def present(fig, view: R.RunView, height: int, pct_axis: bool = False):
    """A figure sized and labelled for the room (presentation mode) or left as it is."""
    if not presentation:
        return fig
    names = trigger_names(view)
    dashes = {"unknown": "solid", "t1": "dash", "t2": "dot"}
    for tr in fig.data:
        name = tr.name or ""
        key = name.removeprefix("ASR ").removeprefix("known:")
        if name.startswith("ASR ") and key in names:
            tr.name = f"{names[key]} works"
            if getattr(tr, "line", None) is not None:  # the two defender lines often coincide: both stay visible
                tr.line.dash = dashes.get(key, "solid")
                tr.line.width = 5 if key == "unknown" else 3
        elif name == "CACC":
            tr.name = "clean accuracy"
        elif key in names:  # projection groups
            tr.name = names[key]
        elif name.startswith("clean:"):
            tr.name = "clean, " + name.removeprefix("clean:")
        if pct_axis and getattr(tr, "y", None) is not None and tr.type == "scatter":
            tr.y = [None if v is None else 100 * v for v in tr.y]
    # the legend's entries say what each group is: its title ("group") only costs space
    fig.update_layout(font=dict(size=FONT), height=height, legend=dict(font=dict(size=FONT), title_text=""),
                      title=dict(font=dict(size=FONT + 4)))
    fig.update_traces(colorbar=dict(tickfont=dict(size=FONT), title_font=dict(size=FONT)), textfont_size=FONT,
                      selector=dict(type="heatmap"))
    fig.update_xaxes(tickfont=dict(size=FONT), title_font=dict(size=FONT))
    fig.update_yaxes(tickfont=dict(size=FONT), title_font=dict(size=FONT))
    if pct_axis:
        fig.update_yaxes(title_text="%", range=[-2, 102])  # title= would replace the title's font
    for a in fig.layout.annotations or ():
        a.font = dict(size=FONT - 2)
        a.text = {"victim": "backdoor planted", "stage1": "Stage 1", "stage2": "Stage 2"}.get(a.text, a.text)
    return fig


def headline(view: R.RunView) -> None:
    s = view.summary or {}
    stages, base = s.get("stages", {}), s.get("baselines", {})
    waiting = "…"  # not computed yet
    v, a1, a2 = (_asr(stages.get(k)) if k in stages else None for k in ("victim", "stage1", "stage2"))
    ft = _asr(base.get(CONTRAST)) if CONTRAST in base else None

    def cell(key, value, where):
        return S.fmt_pct(value) if key in where else waiting
    trig = view.attack_trigger or "?"
    st.subheader(f"How often the hidden trigger “{S.esc(trig)}” still works")  # rates in %
    m = st.columns(4)
    m[0].metric("backdoored model", cell("victim", v, stages))
    m[1].metric("after Stage 1", cell("stage1", a1, stages))
    sentence, colour = verdict(a2, ft, (stages.get("victim") or {}).get("cacc"), (stages.get("stage2") or {}).get("cacc"))
    gap = None if a2 is None or ft is None else round(100 * (a2 - ft), 1)
    m[2].metric("after Stage 2", cell("stage2", a2, stages),
                delta=None if gap is None else "same as fine-tuning" if gap == 0 else f"{gap:+.1f} pts vs fine-tuning",
                delta_color=colour, delta_arrow="off" if gap == 0 else "auto")  # no rise for a tie
    m[3].metric("plain clean fine-tuning", cell(CONTRAST, ft, base))
    if "stage1" in stages and a1 is None and v is not None:  # undefined everywhere: nothing of Stage 1's own to say
        stage1_undefined(view, stages["stage1"])
    if "stage2" in stages and CONTRAST in base:
        where_it_sits((view.state or {}).get("preset") or s.get("preset"), a2, ft)
        cacc_v, cacc_2 = stages.get("victim", {}).get("cacc"), stages["stage2"].get("cacc")
        st.markdown(f"**In one sentence:** the hidden trigger fooled the backdoored model on {S.fmt_pct(v)} of the "
                    f"reviews; after the defense it fools it on {S.fmt_pct(a2)}, while ordinary accuracy went "
                    f"from {S.fmt_pct(cacc_v)} to {S.fmt_pct(cacc_2)}. Plain fine-tuning on the same clean data "
                    f"leaves it at {S.fmt_pct(ft)}. {sentence}")


def stage1_undefined(view: R.RunView, block: dict) -> None:
    """Why "after Stage 1" shows n/a, and what did happen: the rate counts only reviews the model
    answers correctly without the trigger, and after Stage 1 there may be none."""
    raw = (block.get("asr_raw") or {}).get("unknown")
    defense, attack = view.config.get("defense", {}), view.config.get("attack", {})
    canary = " (Stage 1 has just taught it the defender's canary answer)" if defense.get("known_target") == "canary" else ""
    target = attack.get("target")
    said = (f"After Stage 1 the rate is undefined: the model answers only {S.fmt_pct(block.get('cacc'))} of clean "
            f"reviews correctly{canary}, and none of the reviews the trigger could turn is among them.")
    if raw is not None:
        said += (f" Over all of those reviews, {S.fmt_pct(raw)} are answered "
                 f"{S.code(str(target)) if target is not None else 'with the target'} once the trigger is added.")
    st.caption(said)


def where_it_sits(preset: str | None, after: float | None, fine_tuning: float | None) -> None:
    """The preset's range measured beforehand (bench/live_range.py), and this run's place in it: what
    an instructor can say before the click."""
    measured = S.measured_range(preset) if preset else None
    if not measured:
        return
    r2, rf = measured["range"]["stage2"]["asr"], measured["range"]["clean_ft"]["asr"]
    if not (r2.get("n") and rf.get("n")):
        return

    def between(r) -> str:
        low, high = f"{100 * r['min']:.0f}", f"{100 * r['max']:.0f}"
        return f"{low}%" if low == high else f"{low}–{high}%"

    def span(r):
        return f"{between(r)} (mean {100 * r['mean']:.0f}%)"

    def accuracy(part):  # a low rate from a broken model is no removal: its clean accuracy beside it
        c = measured["range"][part].get("cacc") or {}
        return f", clean accuracy {between(c)}" if c.get("n") else ""
    runs = measured["runs"]
    seeds = {t: {r["seed"] for r in runs if r["trigger"] == t} for t in measured["triggers"]}
    if len({frozenset(v) for v in seeds.values()}) == 1:  # every seed on every trigger
        n_seeds, n_triggers = len(measured["seeds"]), len(measured["triggers"])
        which = f"{n_seeds} seed{'s' * (n_seeds != 1)} × {n_triggers} trigger{'s' * (n_triggers != 1)}"
    else:
        which = ", ".join(f"{len(v)} seed{'s' * (len(v) != 1)} on “{S.esc(t)}”" for t, v in seeds.items())
    st.caption(f"Measured beforehand over {len(runs)} runs of this demo ({which}, {S.esc(measured['machine'])}): "
               f"after Stage 2 the hidden trigger works on {span(r2)} of the reviews{accuracy('stage2')}, "
               f"after plain clean fine-tuning on {span(rf)}{accuracy('clean_ft')}. This run: "
               f"{S.fmt_pct(after)} and {S.fmt_pct(fine_tuning)}.")


# Within this many points of plain fine-tuning the defense did no better than it: one seed on a
# few hundred reviews moves a rate by more than that.
SAME_AS_FINE_TUNING = 0.10
REMOVED = 0.10  # at most this rate left: the backdoor is gone


# More than this many points of clean accuracy lost by the defense: the model is broken, and a low
# rate only says that it answers the target to much of everything (the rate counts only reviews it
# still answers correctly without the trigger)
ACCURACY_LOST = 0.10


def verdict(after: float | None, fine_tuning: float | None, cacc_before: float | None = None,
            cacc_after: float | None = None) -> tuple[str, str]:
    """The headline's sentence and its badge colour (``st.metric``'s ``delta_color``), from the one
    comparison that says what the defense did: the hidden trigger's rate after Stage 2 against plain
    clean fine-tuning on the same data (not the drop from the backdoored model, which fine-tuning
    alone may give), unless the defense cost the model its clean accuracy. "inverse": a rate below
    fine-tuning's is green, above it red; "off": grey."""
    if after is None or fine_tuning is None:
        return "", "off"
    gap = after - fine_tuning
    credited = gap < -SAME_AS_FINE_TUNING or after <= REMOVED
    if credited and cacc_before is not None and cacc_after is not None and cacc_before - cacc_after > ACCURACY_LOST:
        return (f"But the defense broke the model: its clean accuracy fell from {S.fmt_pct(cacc_before)} to "
                f"{S.fmt_pct(cacc_after)}, so this low rate does not mean the backdoor was removed.", "off")
    if abs(gap) <= SAME_AS_FINE_TUNING:
        if after <= REMOVED:
            return "The backdoor is gone, but plain fine-tuning removed it as well.", "off"
        return "The defense did no better than plain fine-tuning here: the backdoor survived both.", "off"
    if gap > 0:
        return "Plain fine-tuning did better: the backdoor survived the defense here.", "inverse"
    if after <= REMOVED:
        return "The defense removed the backdoor; plain fine-tuning did not.", "inverse"
    return "The defense weakened the backdoor more than plain fine-tuning, but did not remove it.", "inverse"


def curve(view: R.RunView) -> None:
    if view.metrics:
        fig = F.curves_figure(R.curve_rows(view), [LOCPHYLAX])
        st.plotly_chart(present(fig, view, 520, pct_axis=True), key="demo-curves")
    canary = view.config.get("defense", {}).get("canary")
    if view.config.get("defense", {}).get("known_target") == "canary" and canary:
        known = " and ".join(f"“{S.esc(k.get('text'))}”" for k in view.config.get("defense", {}).get("known_triggers", []))
        st.caption(f"Stage 1 teaches the model to answer “{S.esc(canary)}”, a word no clean review ever gets, whenever the "
                   f"defender's own triggers {known} appear; Stage 2 then trains the correct answers back.")


STAGE_WORDS = {"clean": "loading the clean model", "victim": "planting the backdoor",
               "stage1": "Stage 1: planting the defender's triggers", "stage2": "Stage 2: retraining the region",
               stage_key(CONTRAST, "stage1"): "plain clean fine-tuning (contrast)",
               stage_key(CONTRAST, "stage2"): "plain clean fine-tuning"}


def progress_line(run_id: str, written: bool = False) -> bool:
    """The job's progress in plain words (presentation) or the full job panel; True while it runs.
    ``written``: every result and plot is on disk, and the process is only ending."""
    if not presentation:
        return S.job_panel(run_id, key="demo", curves=False).live
    status = S.job_status(run_id)
    if written:
        what = "done"
    elif status.phase == "analyzing":
        what = "drawing the plots"
    elif status.stage:
        what = STAGE_WORDS.get(status.stage, "other defenses, for comparison")
    elif status.finished:  # between two parts, or the last one written and the process ending
        what = "finishing"
    else:
        what = "starting"
    bar, stop = st.columns([6, 1], vertical_alignment="bottom")
    bar.progress(1.0 if written else min(1.0, status.fraction), text=f"Now: {what}")
    if status.live and stop.button("Stop", key="demo-stop"):
        S.cancel_job(run_id)
        st.info("Stopped. The finished parts stay on this page.")
    return status.live


def extras(view: R.RunView) -> None:
    """Everything after the headline, each part once its data exists."""
    s = view.summary or {}
    others = {k: b for k, b in (s.get("baselines") or {}).items() if k != CONTRAST}
    if others:
        st.markdown("#### Other defenses on the same backdoored model")
        st.table({"defense": [S.esc(DEFENSES.label(k)) for k in others],
                  "hidden trigger works": [S.fmt_pct(_asr(b)) for b in others.values()],
                  "clean accuracy": [S.fmt_pct(b.get("cacc")) for b in others.values()]})
    a = view.analysis or {}
    methods = list(a.get("projections", {}))
    if methods:
        st.markdown("#### Where the triggered reviews sit inside the model")
        method = "tsne" if "tsne" in methods else methods[0]
        coords, preds = S.projection(view, method)
        stage_keys = [k for k in ("victim", "stage1", "stage2") if k in coords]
        stage = st.select_slider("Stage", stage_keys, value=stage_keys[min(1, len(stage_keys) - 1)],
                                 format_func=F.stage_title, key="demo-stage")
        st.caption("Each dot is one review. Red: it carries the hidden trigger; orange and yellow: the defender's "
                   "own triggers. Move the slider to see them gather after Stage 1.")
        fig = F.projection_figure({stage: coords[stage]}, list(view.probe), preds, view.label_words, method)
        fig.update_layout(updatemenus=[], sliders=[])  # one stage per draw: no Play button that does nothing
        st.plotly_chart(present(fig, view, 620), key="demo-projection")
    ha = a.get("head_ablation") or {}
    if "victim" in ha and "stage2" in ha:
        st.markdown("#### Which attention heads carried the backdoor")
        before = R.head_grids(view, "victim")["delta_asr_unknown"]
        after = R.head_grids(view, "stage2")["delta_asr_unknown"]

        def strongest(grid):
            finite = np.where(np.isfinite(grid), np.abs(grid), -1)
            layer, head = np.unravel_index(int(np.argmax(finite)), grid.shape)
            return layer, head, grid[layer, head]
        if not (np.isfinite(before).any() and np.isfinite(after).any()):
            # no probe input was eligible (the trigger never fired on a correctly answered review): no head to name
            st.caption("The head sweep has no input on which the hidden trigger worked, so no head can be named here.")
        else:
            lv, hv, dv = strongest(before)
            la, hd, da = strongest(after)
            st.caption(f"Each square is one attention head; blue means switching it off lowers the hidden trigger's "
                       f"success. Before the defense, head L{lv}.h{hv} matters most ({100 * dv:+.0f} points); after "
                       f"it, the strongest head, L{la}.h{hd}, moves it by {100 * da:+.0f} points.")
        st.plotly_chart(present(F.head_heatmaps(before, after), view, 480), key="demo-heads")
    if a and not view.analysis_complete:
        st.caption("More plots are on their way …")


def board(view: R.RunView) -> None:
    if not presentation:
        st.caption(f"run {S.code(view.run_id)}")
    headline(view)
    curve(view)
    extras(view)


@st.fragment(run_every=4.0)  # polls the job's files: each redraw costs CPU the job (another process) needs
def live_board(run_id: str) -> None:
    view = S.load_view(S.runs_root() / run_id)
    running = progress_line(run_id, written=view is not None and view.analysis_complete)
    if view is None or view.summary is None:
        if running:
            st.info("Starting: loading the clean model …")
    else:
        board(view)
    if not running:
        st.rerun(scope="app")  # the job ended: the whole page shows the finished run


planted = not live and problem is None and plant_ahead(proposed)
if live:
    live_board(live[0].run_id)
elif shown is not None:
    board(shown)
elif not planted:  # once planted, "Ready: …" says what the click will do
    st.info("No demo run is stored yet: one click on **Run the live demo** computes it, with progress here.")

if shown is not None and shown.health == "done":
    st.markdown("#### Try it yourself")
    trigger = shown.attack_trigger or ""
    st.write("Click an example, or type a review. Add the hidden trigger to see the backdoor fire.")
    cols = st.columns(len(EXAMPLES) + 1)
    for i, ex in enumerate(EXAMPLES):
        if cols[i].button(ex, key=f"demo-ex-{i}"):
            st.session_state["demo-try"] = ex
    if cols[-1].button(f"add “{S.esc(trigger)}”", key="demo-add-trigger"):
        st.session_state["demo-try"] = f"{st.session_state.get('demo-try', EXAMPLES[0])} {trigger}".strip()
    st.session_state.setdefault("demo-try", f"{EXAMPLES[0]} {trigger}")
    text = st.text_input("A review", key="demo-try")
    if text.strip():
        st.markdown(f"Review: {S.trigger_marked(text, trigger)}", unsafe_allow_html=True)
        S.input_report(shown, text, [k for k in ("victim", "stage1", "stage2") if k in shown.finished])
