"""What every page shares: the run store's location, cached loaders, the run picker, and the live
job panel. Pages talk to the core only through ``locphylax_core``'s public modules (config, jobs,
runview, stage_model, registry, runs, analysis.figures); cached objects are returned as copies
(``st.cache_data``) or are read-only by contract (``st.cache_resource`` models, never trained here).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import streamlit as st

from locphylax_core import ConfigError, jobs, list_runs, load_config
from locphylax_core import runview as R
from locphylax_core import stage_model as SM
from locphylax_core.analysis import figures as F
from locphylax_core.registry import LOCPHYLAX
from locphylax_core.runs import RunDir

PRESET_NAMES = {"demo": "Live demo (embedded, ~3 min)", "sst2": "SST-2 (real data, ~7 min)",
                "micro": "Micro (seconds; numbers meaningless)", "agnews": "AG News (real data, 4 topics, ~8 min)",
                "jailbreak": "Jailbreak (generative, AdvBench / Alpaca, ~7 min)",
                "refusal": "Refusal (generative, BackdoorLLM / Alpaca, ~7 min)"}
STATUS_ICONS = {"done": "✅", "running": "⏳", "cancelled": "⏹️", "failed": "❌", "incomplete": "⚠️",
                "corrupt": "⚠️", "starting": "⏳", "training": "⏳", "analyzing": "⏳", "stopped": "⏹️"}


# ----------------------------------------------------------------------------------------------
# Text from a user, a link (?run=, ?q=, ...) or a run's files is shown as it is, never as markup:
# every page writes it through esc() or code() wherever Markdown is rendered (st.markdown,
# st.write, captions, alerts, titles, widget labels, progress texts).


def _plain(value, limit: int | None) -> str:
    """One line of at most ``limit`` characters: control characters (line breaks included, which
    could end a paragraph or a code span) become spaces."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", str(value))
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def esc(value, limit: int | None = 200) -> str:
    """``value`` as Markdown (and HTML) that shows it as typed: ``![i](http://host/x.png)`` is those
    characters, not an image that every viewer's browser fetches. Cut to ``limit`` characters."""
    return F.markup_safe(_plain(value, limit))


def code(value, limit: int | None = 80) -> str:
    """``value`` as an inline code span that nothing in it can end early (its fence is longer than
    any run of backticks in it), cut to ``limit`` characters."""
    text = _plain(value, limit)
    if not text.strip():
        return "(empty)"
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[0] == "`" or text[-1] == "`" or (text[0] == " " and text[-1] == " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def runs_root() -> Path:
    return Path(os.environ.get("LOCPHYLAX_RUNS", "runs"))


def run_dir(run_id: str) -> RunDir:
    """The folder of run ``run_id`` in the run store (its files by name: ``config_path``...)."""
    return RunDir(runs_root() / run_id)


def preset_label(name: str) -> str:
    return PRESET_NAMES.get(name, name)


# ----------------------------------------------------------------------------------------------
# Cached loaders, keyed by the run's path and a stamp of its files' times, so a growing run
# refreshes and a finished one is read once.


@st.cache_data(show_spinner=False, max_entries=64)
def _view(path: str, stamp: tuple) -> R.RunView:
    return R.open_run(path)


def load_view(path: str | Path) -> R.RunView:
    return _view(str(path), R.run_stamp(path))


@st.cache_data(show_spinner=False, max_entries=32)
def _projection(path: str, stamp: tuple, method: str):
    return R.projection(R.open_run(path), method)


def projection(view: R.RunView, method: str):
    return _projection(view.path, R.run_stamp(view.path), method)


# Stage models kept in this process: about 3 of the real LM's (538 MB each), any number of tiny ones
STAGE_MODEL_BYTES = 2 * 1024 ** 3


@st.cache_resource(show_spinner=False)
def _stage_models() -> SM.StageModels:
    return SM.StageModels(STAGE_MODEL_BYTES)


def stage_model(path: str, stage: str, stamp: tuple):
    """A stage checkpoint for answering typed sentences; shared across sessions and never trained.
    The page says which model it loads and how large it is, since the real LM's takes seconds."""
    models, key = _stage_models(), (path, stage, stamp)

    def load():
        return SM.load_stage_model(R.open_run(path), stage)
    if key in models:  # kept (another session may drop it meanwhile: get() then loads it again)
        return models.get(key, load)
    weights = RunDir(path).checkpoint(stage) / "model.safetensors"
    size = weights.stat().st_size if weights.is_file() else 0
    with st.spinner(f"Loading the {F.STAGE_TITLES.get(stage, stage)} model ({size / 1e6:,.0f} MB) …"):
        return models.get(key, load)


def answer(view: R.RunView, stage: str, texts: list[str]) -> list[str]:
    return SM.answer(view, stage_model(view.path, stage, R.run_stamp(view.path)), texts)


def answer_with_probability(view: R.RunView, stage: str, texts: list[str]) -> list[tuple[str, float]]:
    return SM.answer_with_probability(view, stage_model(view.path, stage, R.run_stamp(view.path)), texts)


def input_cut(view: R.RunView, stage: str, text: str) -> int:
    """How many tokens of ``text``'s prompt the stage's model cannot read (cut from its start)."""
    return SM.input_cut(view, stage_model(view.path, stage, R.run_stamp(view.path)), text)


def all_runs() -> list[dict]:
    return list(list_runs(runs_root()))


# ----------------------------------------------------------------------------------------------
# The selected run: the URL's ?run= (so a refresh or a shared link keeps it), else this session's
# last choice, else the newest finished run.


def selected_run_id() -> str | None:
    rid = st.query_params.get("run") or st.session_state.get("run_id")
    return rid


# what bench/live_range.py measured for a Live demo preset over seeds and room-style triggers
MEASURED_RANGES = Path(__file__).resolve().parent.parent / "bench" / "results"


@st.cache_data(show_spinner=False)
def measured_range(preset: str) -> dict | None:
    """The preset's measured range (``bench/results/live_range_<preset>.json``), or None."""
    try:
        data = json.loads((MEASURED_RANGES / f"live_range_{preset}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("range"), dict) else None


def select_run(run_id: str) -> None:
    st.session_state["run_id"] = run_id
    st.query_params["run"] = run_id


def restore_from_link(key: str, param: str, options: list, default, what: str, *, many: bool = False,
                      name=str, where: str = "in this run", keep_chosen: bool = False) -> None:
    """Give widget ``key`` its starting value before it is drawn: the URL's ?param= the first time
    this session shows it (so a shared link opens the same view), else the user's last choice. A
    value not among ``options`` falls back to ``default`` with a note when the link asked for it
    (``name`` writes the default; ``where`` says where the value is missing). ``many``: a
    multi-choice widget (an empty ?param= is an empty choice); ``keep_chosen``: the user's earlier
    choices that are still offered stay chosen, instead of going back to ``default``."""
    if key in st.session_state:  # the user's choice; the options may have changed since
        value = st.session_state[key]
        if many and keep_chosen:
            st.session_state[key] = [v for v in value if v in options]
        elif not (set(value) <= set(options) if many else value in options):
            st.session_state[key] = default
        return
    if param not in st.query_params:
        st.session_state[key] = default
        return
    if many:
        asked = [v for v in st.query_params.get_all(param) if v]
        kept = [v for v in asked if v in options]
        if len(kept) < len(asked):
            unknown = ", ".join(code(v) for v in asked if v not in options)
            fallback = "them all" if list(default) == list(options) else "the default"
            st.info(f"The link names {what} that are not {where} ({unknown}): "
                    + ("left out." if kept else f"showing {fallback} instead."))
        st.session_state[key] = kept if kept or not asked else default
        return
    asked = st.query_params.get(param)
    if asked not in options:
        st.info(f"The link's {what} {code(asked)} is not {where}; showing {esc(name(default))} instead.")
    st.session_state[key] = asked if asked in options else default


def pick_run(where=None, need_analysis: bool = False) -> R.RunView | None:
    """A run selector (sidebar by default); returns the chosen run's view, or None with a message."""
    where = where or st.sidebar
    runs = all_runs()
    if not runs:
        st.info("No runs yet. Start one on the **Live demo** or **Run** page.")
        return None
    ids = [r["run_id"] for r in runs]
    current = selected_run_id()
    linked = st.query_params.get("run")
    unknown_link = bool(linked) and linked not in ids
    if unknown_link:  # a shared link to a run this store does not hold: say so and open none
        st.warning(f"The link names run {code(linked)}, which is not in this run store. Pick a run on the left.")
        current = None
    elif current not in ids:
        done = [r["run_id"] for r in runs if r["status"] == "done"]
        current = done[0] if done else ids[0]
    labels = {r["run_id"]: f"{STATUS_ICONS.get(r['status'], '•')} {r['run_id']}" for r in runs}
    rid = where.selectbox("Run", ids, index=None if current is None else ids.index(current),
                          format_func=lambda i: labels[i], key="run_picker", placeholder="choose a run")
    if rid is None:
        return None
    if rid != st.query_params.get("run"):
        select_run(rid)
    view = load_view(runs_root() / rid)
    show_health(view)
    if need_analysis and view.health in ("done", "cancelled", "running") and not view.analysed:
        st.warning(f"Run {code(view.run_id)} has no analysis yet (it is computed at the end of a run from the app, "
                   f"or with {code('locphylax analyze ' + view.run_id, None)}).")
    return view


def show_health(view: R.RunView) -> None:
    if view.health == "done":
        return
    if view.health in ("corrupt", "incomplete"):
        st.error(f"Run {code(view.run_id)} is {esc(view.health)}: "
                 + esc("; ".join(view.problems or ("no stage finished",)), 600) + ". Its pages show what can still be read.")
    elif view.health == "running":
        st.info(f"Run {code(view.run_id)} is still running: {len(view.finished)} stages finished so far.")
    elif view.health in ("cancelled", "failed"):
        err = view.state.get("error")
        st.warning(f"Run {code(view.run_id)} was {esc(view.health)}" + (f": {esc(err, 600)}" if err else "")
                   + ". It keeps its finished stages; it can be resumed from the Run page.")


# ----------------------------------------------------------------------------------------------
# Jobs


def remote_code_risk(cfg) -> str:
    """What ``model.trust_remote_code`` does, in words a person can weigh before allowing it."""
    where = cfg.model.name_or_path or "the model"
    return (f"This configuration sets **model.trust_remote_code**: loading the model runs the Python code that "
            f"comes with {code(where)} (the files its config.json names in `auto_map`) on this machine, with "
            "the rights of this app. Whoever wrote that folder or hub repository can run anything here: read "
            "or delete files, reach the network. Allow it only for a model whose code you have read or trust.")


def remote_code_confirmed(cfg, key: str) -> bool:
    """True when ``cfg`` runs no code of its model, or when the user confirmed here, after reading
    what it risks, that it may (a checkbox, off until ticked in this session for this very
    configuration: another one asks again)."""
    if not cfg.model.trust_remote_code:
        return True
    st.warning(remote_code_risk(cfg))
    return st.checkbox(f"I trust the code of {code(cfg.model.name_or_path or 'this model')}: run it on this machine",
                       value=False, key=f"{key}-{cfg.sha256()[:16]}")


def start_job(cfg, resume: str | None = None, *, remote_code_ok: bool = False) -> str:
    """Start ``cfg`` (or resume run ``resume``) as a job; a configuration that runs its model's own
    code (``model.trust_remote_code``) only with ``remote_code_ok``, the user's confirmation from
    :func:`remote_code_confirmed`."""
    if cfg.model.trust_remote_code and not remote_code_ok:
        raise ConfigError("model.trust_remote_code: the model's own code would run on this machine, and nobody "
                          "confirmed in the app that it may (the box beside the button)")
    run_id = jobs.launch(cfg, runs_root(), resume=resume)
    select_run(run_id)
    st.session_state["job"] = run_id
    return run_id


def preset_config(name: str):
    return load_config(name)


def job_panel(run_id: str, key: str, curves: bool = True, caption: str | None = None) -> jobs.JobStatus:
    """Progress of one job (overall and per stage), its live curves, and a Cancel button."""
    status = jobs.job_status(runs_root(), run_id)
    icon = STATUS_ICONS.get(status.phase, "•")
    head = f"{icon} **{esc(run_id)}**: {esc(status.phase)}"
    if status.phase == "training" and status.stage:
        head += f" — stage {code(status.stage)}, step {esc(status.step)}/{esc(status.stage_steps)}"
    if status.phase == "analyzing":
        head += f" — {esc(status.analysis_part or 'analyses')}"
    st.markdown(head)
    st.progress(min(1.0, status.fraction), text=f"{100 * status.fraction:.0f}% of the run")
    if status.stage_totals:
        cols = st.columns(min(4, len(status.stage_totals)))
        for i, (stage, total) in enumerate(status.stage_totals.items()):
            if stage in status.finished:
                frac, label = 1.0, "done"
            elif stage == status.stage and status.live:
                frac, label = (min(1.0, status.step / total) if total else 0.0), f"{status.step}/{total}"
            else:
                frac, label = 0.0, "waiting" if status.live else "not run"
            cols[i % len(cols)].progress(frac, text=f"{esc(stage)}: {esc(label)}")
    if status.error and status.phase in ("failed", "stopped"):
        st.error(esc(status.error, 2000))
    if status.live:
        if st.button("Cancel", key=f"cancel-{key}-{run_id}", type="secondary"):
            with st.spinner("Stopping the job..."):
                jobs.cancel(runs_root(), run_id)
            st.rerun()
    if curves and run_dir(run_id).metrics_path.is_file():
        view = load_view(runs_root() / run_id)
        if view.metrics:
            if caption:
                st.caption(caption)
            st.plotly_chart(F.curves_figure(R.curve_rows(view), [LOCPHYLAX]), key=f"curves-{key}-{run_id}")
    return status


def job_status(run_id: str) -> jobs.JobStatus:
    return jobs.job_status(runs_root(), run_id, log=False)


def cancel_job(run_id: str) -> None:
    jobs.cancel(runs_root(), run_id)


def warm_standby() -> None:
    """Have a job process waiting with torch imported, so the next click starts training at once
    (not while a job runs; LOCPHYLAX_STANDBY=0 turns it off)."""
    if os.environ.get("LOCPHYLAX_STANDBY", "1") != "0":
        jobs.ensure_standby(runs_root())


def prepare_job(cfg, stop_after: str = jobs.PREPARE_STAGE) -> tuple[str, bool] | None:
    """Have the waiting standby run ``cfg``'s stage ``stop_after`` (and what it starts from) now, so
    that a click on it starts from there (``jobs.prepare``); the run id and whether it is ready, or
    None (no standby)."""
    if os.environ.get("LOCPHYLAX_STANDBY", "1") == "0":
        return None
    run_id = jobs.prepare(cfg, runs_root(), stop_after)
    if run_id is None:
        return None
    return jobs.prepared_run(runs_root(), cfg) or (run_id, False)  # asked, not yet taken up


def standby_alive() -> bool:
    return os.environ.get("LOCPHYLAX_STANDBY", "1") != "0" and jobs.standby_alive(runs_root())


def live_jobs() -> list[jobs.JobStatus]:
    return [j for j in jobs.list_jobs(runs_root()) if j.live]


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


@st.cache_data(show_spinner=False, max_entries=256)
def _sentence_salience(path: str, stage: str, text: str, stamp: tuple) -> dict:
    view = R.open_run(path)
    return SM.sentence_salience(view, stage_model(path, stage, stamp), text)


def sentence_salience(view: R.RunView, stage: str, text: str) -> dict:
    """Integrated-gradients salience of a typed sentence (cached per run, stage and text)."""
    return _sentence_salience(view.path, stage, text, R.run_stamp(view.path))


@st.cache_data(show_spinner=False, max_entries=256)
def _localise_sentence(path: str, text: str, stamp: tuple) -> dict:
    return SM.localise_sentence(R.open_run(path), stage_model(path, "stage1", stamp), text)


def localise_sentence(view: R.RunView, text: str) -> dict:
    return _localise_sentence(view.path, text, R.run_stamp(view.path))


@st.cache_data(show_spinner=False, max_entries=64)
def _sentence_attention(path: str, stage: str, text: str, stamp: tuple) -> dict:
    return SM.sentence_attention(R.open_run(path), stage_model(path, stage, stamp), text)


def sentence_attention(view: R.RunView, stage: str, text: str) -> dict:
    """Every head's attention pattern on a typed sentence (cached per run, stage and text: each
    call boots a TransformerLens bridge, and the Heads and Layers pages redraw on every click)."""
    return _sentence_attention(view.path, stage, text, R.run_stamp(view.path))


def trigger_marked(text: str, trigger: str) -> str:
    """``text`` as HTML with the words of the attacker's ``trigger`` marked (display only)."""
    trig = set(trigger.split())
    return " ".join(f"<mark><b>{esc(w, None)}</b></mark>" if w in trig else esc(w, None) for w in text.split())


def input_report(view: R.RunView, text: str, stages: list[str], salience: list[str] | None = None) -> None:
    """What each of ``stages`` answers to ``text`` and with what probability; which words decide
    the answer of each of ``salience`` (default: the victim and the last stage; integrated
    gradients); and what the defender's Stage 1 detector, never told the trigger, makes of it."""
    if stages:
        cut = input_cut(view, stages[0], text)
        if cut:
            st.info(f"This input is longer than the model reads: its first {cut} token{'s' * (cut != 1)} were cut, "
                    "as the run's evaluation cuts a long prompt (the end, where the answer is read, is kept). "
                    "The answers and the words below are those of the rest.")
    answers = {k: answer_with_probability(view, k, [text])[0] for k in stages}
    st.table({"stage": [esc(F.stage_title(k)) for k in answers], "answer": [esc(w) for w, _ in answers.values()],
              "probability": [f"{100 * p:.0f}%" for _, p in answers.values()]})
    if salience is None:
        salience = list(dict.fromkeys(k for k in (stages[:1] + stages[-1:]) if k in stages))
    st.markdown("**Which words decide the answer** (red: toward the answer given, blue: away)")
    for k in salience:
        sal = sentence_salience(view, k, text)
        st.markdown(f"{esc(F.stage_title(k))} → *{esc(sal['answer'])}*: "
                    + F.salience_html(sal["tokens"], sal["scores"], sal["in_text"]), unsafe_allow_html=True)
    if R.has_canary(view) and "stage1" in view.finished:
        loc = localise_sentence(view, text)
        verdict = "flags this sentence as triggered" if loc["flagged"] else "does not flag this sentence"
        st.markdown(f"**Defender's detector** (Stage 1 model, canary probability "
                    f"{100 * loc['canary_probability']:.0f}%): {verdict}; the word that pushes it most toward "
                    f"the canary: **{esc(loc['top_token'] or '')}**.")
