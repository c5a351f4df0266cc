"""Run: start the pipeline as a separate process, watch it live, cancel or resume it. Jobs are
found on disk, so a refresh or a second tab re-attaches to whatever is running."""

import streamlit as st
import yaml

import support as S
from locphylax_core import ConfigError, RunConfig, list_presets, load_config
from locphylax_core.config import load_run_config
from locphylax_core.errors import RunError

st.title("Run")

setup_yaml = st.session_state.get("setup_config")
choices = (["(the configuration from Setup)"] if setup_yaml else []) + list_presets()
default = 0 if setup_yaml else choices.index("demo") if "demo" in choices else 0
choice = st.selectbox("What to run", choices, index=default,
                      format_func=lambda c: c if c.startswith("(") else S.preset_label(c), key="run_choice")
try:
    cfg = RunConfig.model_validate(yaml.safe_load(setup_yaml)) if choice.startswith("(") else load_config(choice)
except ConfigError as e:  # a preset file edited by hand
    st.error(S.esc(e, 2000))
    cfg = None
live = S.live_jobs()
if live:
    st.caption(f"{len(live)} job(s) running: a new one gets one CPU thread so they do not slow each other "
               "down by an order of magnitude.")
remote_code_ok = cfg is not None and S.remote_code_confirmed(cfg, "run_remote_code_ok")
if cfg is not None and st.button("Start run", type="primary", key="start_run", disabled=not remote_code_ok):
    S.start_job(cfg, remote_code_ok=remote_code_ok)
    st.rerun()


@st.fragment(run_every=2.0)  # a live view costs CPU that the job on a small machine needs
def watch(run_id: str) -> None:
    status = S.job_panel(run_id, key="run", caption="CACC and ASR on the in-stage evaluation subset, growing "
                                                      "as metrics.jsonl grows.")
    if not status.live:
        st.rerun(scope="app")


shown = set()
for job in live:
    st.subheader(f"Running: {S.esc(job.run_id)}")
    watch(job.run_id)
    shown.add(job.run_id)

# Every job seen running in this session, and the one it started last: once such a job ends (a click
# on Cancel included) its outcome stays on the page with a way to resume it, rather than its panel
# just vanishing.
seen_live = list(dict.fromkeys([*st.session_state.get("run_seen_live", []), *shown]))
st.session_state["run_seen_live"] = seen_live


def remote_code_allowed(run_id: str, key: str) -> bool:
    """False while the stored run's config.yaml trusts its model's code and the user has not
    confirmed it here (a damaged config.yaml is reported when resuming)."""
    try:
        return S.remote_code_confirmed(load_run_config(S.run_dir(run_id).config_path), key)
    except ConfigError:
        return True


def resume_button(run_id: str) -> None:
    remote_code_ok = remote_code_allowed(run_id, f"remote-code-ok-{run_id}")
    if st.button("Resume this run", key=f"resume-{run_id}", type="primary", disabled=not remote_code_ok):
        try:
            cfg = load_run_config(S.run_dir(run_id).config_path)
        except ConfigError as e:  # the run folder's config.yaml, edited or damaged
            problems = "; ".join(f"{k}: {m}" for k, m in (e.fields or {}).items()) or "it is not valid YAML"
            st.error(f"Run {S.code(run_id)} cannot be resumed: its config.yaml does not validate "
                     f"({S.esc(problems, 2000)}).")
            return
        try:
            S.start_job(cfg, resume=run_id, remote_code_ok=remote_code_ok)
        except RunError as e:  # the run is still held by a live process: resuming would run it twice
            st.error(S.esc(e, 2000))
            return
        st.rerun()


def ended_job(run_id: str) -> None:
    status = S.job_panel(run_id, key="ended")
    resumable = S.run_dir(run_id).config_path.is_file()
    if status.phase == "done":
        st.success("Finished. Its plots are on the Aggregation, Heads and Compare pages.")
    elif status.phase in ("cancelled", "stopped"):
        if not resumable:
            st.info("Stopped before the run wrote its folder, so there is nothing to resume; start it again above.")
        else:
            kept = (f"its finished stages ({S.esc(', '.join(status.finished))})" if status.finished
                    else "its folder (no stage had finished yet)")
            st.info(f"Stopped. The run keeps {kept}; resume it here.")
    elif status.phase == "failed":
        st.warning("Failed. The run keeps its finished stages" + ("; resume it here once the cause is fixed."
                                                                 if resumable else "."))
    elif status.phase == "missing":
        st.warning(f"The job {S.code(run_id)} is no longer in the run store.")
    if status.phase in ("cancelled", "stopped", "failed") and resumable:
        resume_button(run_id)
    if status.log_tail and status.phase in ("failed", "stopped"):
        with st.expander("Job log (end)"):
            st.code(status.log_tail)


last = st.session_state.get("job")
for run_id in dict.fromkeys([last, *reversed(seen_live)]):
    if run_id and run_id not in shown:
        st.subheader(f"{'Last job' if run_id == last else 'Ended'}: {S.esc(run_id)}")
        ended_job(run_id)

st.divider()
st.subheader("Stored runs")
runs = S.all_runs()
if not runs:
    st.info("No runs yet.")
else:
    st.dataframe([{"run": r["run_id"], "preset": r["preset"], "status": f"{S.STATUS_ICONS.get(r['status'], '')} "
                   f"{r['status']}", "finished stages": len(r["finished"])} for r in runs],
                 hide_index=True, key="runs_table")
    resumable = [r["run_id"] for r in runs if r["status"] in ("cancelled", "failed", "running")
                 and r["run_id"] not in shown]
    if resumable:
        c1, c2 = st.columns([3, 1])
        pick = c1.selectbox("Resume a stopped run", resumable, key="resume_pick")
        remote_code_ok = remote_code_allowed(pick, f"resume-remote-code-ok-{pick}")
        if c2.button("Resume", key="resume_btn", disabled=not remote_code_ok):
            try:
                S.start_job(load_run_config(S.run_dir(pick).config_path), resume=pick,
                            remote_code_ok=remote_code_ok)
            except (ConfigError, RunError) as e:  # a damaged config.yaml, or a run a live process holds
                st.error(S.esc(e, 2000))
            else:
                st.rerun()
