"""Run: start the pipeline as a separate process, watch it live, cancel or resume it. Jobs are
found on disk, so a refresh or a second tab re-attaches to whatever is running."""

import streamlit as st
import yaml

import support as S
from locphylax_core import ConfigError, RunConfig, list_presets, load_config
from locphylax_core.config import load_run_config

st.title("Run")

setup_yaml = st.session_state.get("setup_config")
choices = (["(the configuration from Setup)"] if setup_yaml else []) + list_presets()
default = 0 if setup_yaml else choices.index("demo") if "demo" in choices else 0
choice = st.selectbox("What to run", choices, index=default,
                      format_func=lambda c: c if c.startswith("(") else S.preset_label(c), key="run_choice")
try:
    cfg = RunConfig.model_validate(yaml.safe_load(setup_yaml)) if choice.startswith("(") else load_config(choice)
except ConfigError as e:  # a preset file edited by hand
    st.error(str(e))
    cfg = None
live = S.live_jobs()
if live:
    st.caption(f"{len(live)} job(s) running: a new one gets one CPU thread so they do not slow each other "
               "down by an order of magnitude.")
if cfg is not None and st.button("Start run", type="primary", key="start_run"):
    S.start_job(cfg)
    st.rerun()


@st.fragment(run_every=2.0)  # a live view costs CPU that the job on a small machine needs
def watch(run_id: str) -> None:
    status = S.job_panel(run_id, key="run", caption="CACC and ASR on the in-stage evaluation subset, growing "
                                                      "as metrics.jsonl grows.")
    if not status.live:
        st.rerun(scope="app")


shown = set()
for job in live:
    st.subheader(f"Running: {job.run_id}")
    watch(job.run_id)
    shown.add(job.run_id)

# the job this session started last, once it has ended: its outcome stays on the page
last = st.session_state.get("job")
if last and last not in shown:
    st.subheader(f"Last job: {last}")
    status = S.job_panel(last, key="last")
    if status.phase == "done":
        st.success("Finished. Its plots are on the Aggregation, Heads and Compare pages.")
    if status.phase in ("cancelled", "stopped", "failed") and (S.runs_root() / last / "config.yaml").is_file():
        if st.button("Resume this run", key="resume_last"):
            S.start_job(load_run_config(S.runs_root() / last / "config.yaml"), resume=last)
            st.rerun()
    if status.log_tail and status.phase in ("failed", "stopped"):
        with st.expander("Job log (end)"):
            st.code(status.log_tail)

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
        if c2.button("Resume", key="resume_btn"):
            S.start_job(load_run_config(S.runs_root() / pick / "config.yaml"), resume=pick)
            st.rerun()
