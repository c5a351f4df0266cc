"""Background jobs: a run in a separate process that the app can find again, watch and stop."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_tensors, numbers

from locphylax_core import jobs, load_config


def _wait(root, run_id, until, timeout=240.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = jobs.job_status(root, run_id)
        if until(s):
            return s
        time.sleep(0.2)
    raise AssertionError(f"job {run_id} did not reach the state in {timeout}s: {jobs.job_status(root, run_id)}")


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """The process has exited (a zombie not yet reaped by its parent's reaper thread counts)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def _slow_micro():
    # long enough to be caught mid-training, on the micro model
    return load_config("micro", {"train.clean_steps": 20000, "eval.clean_every": 50})


def test_job_runs_to_the_end_in_its_own_process(tmp_path):
    cfg = load_config("micro")
    run_id = jobs.launch(cfg, tmp_path, analyze=False)
    rec = json.loads((tmp_path / ".jobs" / f"{run_id}.json").read_text())
    assert rec["pid"] != os.getpid() and rec["run_id"] == run_id
    phases = set()
    s = _wait(tmp_path, run_id, lambda s: phases.add(s.phase) or not s.live)
    assert s.phase == "done" and not s.alive and s.fraction == 1.0, s
    assert phases <= {"starting", "training", "analyzing", "done"}
    summary = json.loads((tmp_path / run_id / "summary.json").read_text())
    assert summary["status"] == "done" and summary["run_id"] == run_id
    assert json.loads((tmp_path / ".jobs" / f"{run_id}.exit.json").read_text())["rc"] == 0
    assert [j.run_id for j in jobs.list_jobs(tmp_path)] == [run_id]


def test_cancel_really_stops_the_process_and_leaves_a_resumable_run(tmp_path):
    run_id = jobs.launch(_slow_micro(), tmp_path, analyze=False)
    s = _wait(tmp_path, run_id, lambda s: s.phase == "training" and s.stage == "clean" and s.step > 0)
    pid = json.loads((tmp_path / ".jobs" / f"{run_id}.json").read_text())["pid"]
    t0 = time.monotonic()
    s = jobs.cancel(tmp_path, run_id, grace=15)
    assert time.monotonic() - t0 < 20
    assert s.phase == "cancelled" and not s.alive, s
    assert not Path(f"/proc/{pid}").exists() or _gone(pid)
    state = json.loads((tmp_path / run_id / "state.json").read_text())
    assert state["status"] == "cancelled"
    assert not (tmp_path / run_id / "CANCEL").exists()


def test_a_killed_job_is_reported_as_stopped(tmp_path):
    run_id = jobs.launch(_slow_micro(), tmp_path, analyze=False)
    _wait(tmp_path, run_id, lambda s: s.phase == "training" and s.step > 0)
    pid = json.loads((tmp_path / ".jobs" / f"{run_id}.json").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    s = _wait(tmp_path, run_id, lambda s: not s.alive, timeout=20)
    assert s.phase == "stopped" and "resumed" in s.error


def test_two_jobs_get_separate_runs_and_the_second_one_thread(tmp_path):
    cfg = _slow_micro().model_copy(update={"train": _slow_micro().train.model_copy(update={"threads": 2})})
    first = jobs.launch(cfg, tmp_path, analyze=False)
    _wait(tmp_path, first, lambda s: s.live)
    second = jobs.launch(cfg, tmp_path, analyze=False)
    try:
        assert first != second
        threads = [yaml.safe_load((tmp_path / ".jobs" / f"{r}.yaml").read_text())["train"]["threads"]
                   for r in (first, second)]
        assert threads == [2, 1]
        for r in (first, second):  # both past "starting": their run folders exist
            _wait(tmp_path, r, lambda s: s.phase == "training")
        assert {j.run_id for j in jobs.list_jobs(tmp_path) if j.live} == {first, second}
        assert (tmp_path / first).is_dir() and (tmp_path / second).is_dir()
    finally:
        for r in (first, second):
            jobs.cancel(tmp_path, r, grace=15)
    assert not any(j.live for j in jobs.list_jobs(tmp_path))


def test_bad_config_file_fails_the_job_with_its_message(tmp_path):
    run_id = jobs.launch(load_config("micro", {"task.name": "csv", "task.path": str(tmp_path / "nope.csv")}), tmp_path)
    s = _wait(tmp_path, run_id, lambda s: not s.live and s.phase != "starting")
    assert s.phase == "failed" and "nope" in (s.error or ""), s
    assert not (tmp_path / run_id).exists()  # nothing half-made is left


def test_unknown_job_is_missing_not_an_exception(tmp_path):
    s = jobs.job_status(tmp_path, "no-such-run")
    assert s.phase == "missing" and not s.live
    assert jobs.list_jobs(tmp_path / "nothing") == []


def test_progress_fraction_counts_finished_and_current_steps():
    s = jobs.JobStatus("r", "training", True, stage="b", step=5, finished=("a",), stage_totals={"a": 10, "b": 10})
    assert s.fraction == pytest.approx(0.9 * 15 / 20)
    assert jobs.JobStatus("r", "done", False).fraction == 1.0
    assert Path(jobs.jobs_dir("x")).name == ".jobs"


def _ready_standby(root) -> int:
    assert jobs.ensure_standby(root)
    t0 = time.monotonic()
    while not jobs.standby_ready(root):
        assert time.monotonic() - t0 < 120, "the standby never became ready"
        time.sleep(0.1)
    return json.loads((root / ".jobs" / "standby" / "state.json").read_text())["pid"]


def _prepared(root, cfg, timeout=120.0) -> str:
    t0 = time.monotonic()
    while True:
        got = jobs.prepared_run(root, cfg)
        if got is not None and got[1]:
            return got[0]
        assert time.monotonic() - t0 < timeout, "the standby never finished preparing"
        time.sleep(0.1)


def test_a_warm_standby_takes_the_next_job_and_starts_it_at_once(tmp_path):
    """ensure_standby starts a process that imports torch and transformers ahead of time; launch
    hands it the job (the record names the standby's pid) instead of starting a cold process."""
    pid = _ready_standby(tmp_path)
    state = tmp_path / ".jobs" / "standby" / "state.json"
    assert jobs.ensure_standby(tmp_path) and json.loads(state.read_text())["pid"] == pid  # one is enough
    assert [j.run_id for j in jobs.list_jobs(tmp_path)] == []  # the standby is not a job
    run_id = jobs.launch(load_config("micro", {"defense.baselines": []}), tmp_path, analyze=False)
    rec = json.loads((tmp_path / ".jobs" / f"{run_id}.json").read_text())
    assert rec["pid"] == pid and rec["standby"] is True
    assert not jobs.stop_standby(tmp_path)  # it is the job now: left alone
    s = _wait(tmp_path, run_id, lambda s: not s.live)
    assert s.phase == "done", (s, (tmp_path / ".jobs" / f"{run_id}.log").read_text()[-2000:])
    assert "victim" in json.loads((tmp_path / run_id / "summary.json").read_text())["stages"]
    assert _gone(pid) and not jobs.standby_ready(tmp_path)  # one job per standby; without one, launch
    # starts a fresh process as before (test_job_runs_to_the_end_in_its_own_process)


def test_an_idle_standby_is_retired_when_its_app_stops(tmp_path):
    assert jobs.ensure_standby(tmp_path)
    pid = json.loads((tmp_path / ".jobs" / "standby" / "state.json").read_text())["pid"]
    assert jobs.stop_standby(tmp_path)
    t0 = time.monotonic()
    while not _gone(pid):
        assert time.monotonic() - t0 < 60, "the retired standby did not exit"
        time.sleep(0.1)
    assert not jobs.standby_ready(tmp_path) and not jobs.stop_standby(tmp_path)


def test_a_prepared_run_is_continued_by_the_launch_of_its_configuration(tmp_path, micro_run):
    """prepare() has the standby plant the backdoor ahead of the click; the launch of the same
    configuration continues that run, with the results of a run that never stopped."""
    pid = _ready_standby(tmp_path)
    cfg = load_config("micro")
    run_id = jobs.prepare(cfg, tmp_path)
    assert run_id is not None and jobs.prepare(cfg, tmp_path) == run_id  # asked once
    assert _prepared(tmp_path, cfg) == run_id
    state = json.loads((tmp_path / run_id / "state.json").read_text())
    assert state["status"] == "prepared" and state["finished"] == ["clean", "victim"]
    assert jobs.list_jobs(tmp_path) == []  # a prepared run is not a job
    assert jobs.launch(cfg, tmp_path, analyze=False) == run_id
    rec = json.loads((tmp_path / ".jobs" / f"{run_id}.json").read_text())
    assert rec["pid"] == pid and rec["prepared"] is True
    s = _wait(tmp_path, run_id, lambda s: not s.live)
    assert s.phase == "done", (s, (tmp_path / ".jobs" / f"{run_id}.log").read_text()[-2000:])
    summary = json.loads((tmp_path / run_id / "summary.json").read_text())
    assert numbers(summary) == numbers(micro_run.summary)
    a = load_tensors(tmp_path / run_id / "checkpoints" / "stage2" / "model.safetensors")
    b = load_tensors(micro_run.run.checkpoint("stage2") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_configuration_replaces_the_prepared_run_and_nothing_unused_is_left(tmp_path):
    _ready_standby(tmp_path)
    a = load_config("micro", {"defense.baselines": []})
    b = load_config("micro", {"defense.baselines": [], "attack.trigger": "zq"})
    c = load_config("micro", {"defense.baselines": [], "attack.trigger": "jw"})
    run_a = jobs.prepare(a, tmp_path)
    _prepared(tmp_path, a)
    run_b = jobs.prepare(b, tmp_path)
    assert run_b != run_a and _prepared(tmp_path, b) == run_b
    assert not (tmp_path / run_a).exists() and jobs.prepared_run(tmp_path, a) is None
    run_c = jobs.launch(c, tmp_path, analyze=False)  # another configuration: run from the start
    assert run_c not in (run_a, run_b)
    assert _wait(tmp_path, run_c, lambda s: not s.live).phase == "done"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [run_c]
    # a standby retired with a prepared run deletes it
    pid = _ready_standby(tmp_path)
    run_d = jobs.prepare(a, tmp_path)
    _prepared(tmp_path, a)
    assert jobs.stop_standby(tmp_path) and _gone(pid, timeout=30)
    assert not (tmp_path / run_d).exists()
    assert jobs.prepare(a, tmp_path) is None  # no standby: nothing is prepared


def test_cancel_stops_a_job_run_by_the_standby(tmp_path):
    assert jobs.ensure_standby(tmp_path)
    run_id = jobs.launch(_slow_micro(), tmp_path, analyze=False)  # taken as soon as the standby is ready
    _wait(tmp_path, run_id, lambda s: s.phase == "training" and s.step > 0)
    s = jobs.cancel(tmp_path, run_id)
    assert s.phase == "cancelled" and not s.alive, s
