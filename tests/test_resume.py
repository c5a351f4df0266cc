"""Resume after SIGKILL, concurrent run folders, cancel + resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli, cli_env, load_tensors, numbers, read_jsonl
from locphylax_core import cli as cli_mod
from locphylax_core import load_config, resume_run, start_run
from locphylax_core import runs as runs_mod
from locphylax_core.errors import Cancelled
from locphylax_core.errors import LocphylaxError, RunError
from locphylax_core import Reporter
from locphylax_core.runs import RunDir, find_run, list_runs


def _read_state(root: Path):
    dirs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    if len(dirs) != 1:
        return None, None
    try:
        return dirs[0], json.loads((dirs[0] / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return dirs[0], None


def _same_weights(run_a: RunDir, run_b: RunDir, key: str) -> bool:
    a = load_tensors(run_a.checkpoint(key) / "model.safetensors")
    b = load_tensors(run_b.checkpoint(key) / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill(micro_run, tmp_path):
    root = tmp_path / "runs"
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "locphylax_core.cli", "--runs", str(root), "run", "micro", "--no-analyze"],
                            cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    folder = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            folder, state = _read_state(root)
            if state is not None and "victim" in state.get("finished", []):
                break
            assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'run.log').read_text()}"
            time.sleep(0.005)
        else:
            pytest.fail("victim never finished")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    state = json.loads((folder / "state.json").read_text())
    assert state["status"] != "done"
    assert "victim" in state["finished"]
    assert len(state["finished"]) < 10
    listed = {i["run_id"]: i for i in list_runs(root)}
    assert listed[folder.name]["status"] == "running"  # killed: it never got to write anything else

    res = cli("--runs", str(root), "resume", folder.name, "--no-analyze")
    assert res.returncode == 0, res.stderr
    assert "Stage 2 (Locphylax)" in res.stdout

    run = RunDir(folder)
    summary = run.read_summary()
    assert summary["status"] == "done"
    assert run.read_state()["finished"] == micro_run.run.read_state()["finished"]
    # identical numbers to the uninterrupted reference run, thanks to per-stage seeds
    assert numbers(summary) == numbers(micro_run.summary)
    for key in ("victim", "stage1", "stage2", "unlearn_single/stage2"):
        assert _same_weights(run, micro_run.run, key), key
    # no duplicate rows from the stage that was cut off
    rows = read_jsonl(folder / "metrics.jsonl")
    test_rows = [r["key"] for r in rows if r["split"] == "test"]
    assert sorted(test_rows) == sorted(set(test_rows)) and len(test_rows) == 10
    curve = [(r["key"], r["step"]) for r in rows if r["split"] == "curve"]
    assert len(curve) == len(set(curve))
    ref_curve = [(r["key"], r["step"]) for r in read_jsonl(micro_run.path / "metrics.jsonl") if r["split"] == "curve"]
    assert sorted(curve) == sorted(ref_curve)

    # resuming a finished run (by id prefix) changes nothing
    assert cli_mod.main(["--runs", str(root), "resume", folder.name[:-3], "--no-analyze"]) == 0
    assert run.read_summary() == summary


def test_concurrent_create_gets_distinct_folders(tmp_path, monkeypatch):
    # Force every thread's first id to collide; os.mkdir lets exactly one of them have it.
    lock = threading.Lock()
    calls = {"n": 0}
    real = runs_mod.new_run_id

    def colliding(preset):
        with lock:
            calls["n"] += 1
            first = calls["n"] <= 8
        return "same-id" if first else real(preset)

    monkeypatch.setattr(runs_mod, "new_run_id", colliding)
    barrier = threading.Barrier(8)
    out, errors = [], []

    def work():
        try:
            barrier.wait()
            out.append(RunDir.create(tmp_path, "micro"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    paths = [r.path for r in out]
    assert len(paths) == len(set(paths)) == 8
    assert all(p.is_dir() for p in paths)
    assert sum(p.name == "same-id" for p in paths) == 1
    assert calls["n"] >= 15  # 8 colliding first tries, then 7 retries


def test_explicit_run_id_that_exists(tmp_path):
    RunDir.create(tmp_path, "micro", run_id="mine")
    with pytest.raises(RunError, match="already exists"):
        RunDir.create(tmp_path, "micro", run_id="mine")


class _CancelAfterVictim(Reporter):
    """Calls `locphylax cancel <id>` (in-process) as soon as the victim stage is finished."""

    def __init__(self, root):
        self.root = root
        self.path = None
        self.cancel_rc = None
        self.started = []

    def message(self, text):
        self.path = Path(text.split("run folder: ", 1)[1])

    def stage_started(self, key, total_steps):
        self.started.append(key)

    def stage_finished(self, key, result):
        if key == "victim":
            self.cancel_rc = cli_mod.main(["--runs", str(self.root), "cancel", self.path.name])


def test_cancel_then_resume(micro_run, tmp_path, capsys):
    root = tmp_path / "runs"
    rep = _CancelAfterVictim(root)
    with pytest.raises(Cancelled):
        start_run(load_config("micro"), runs_root=root, reporter=rep)
    assert rep.cancel_rc == 0
    assert f"asked {rep.path.name} to stop" in capsys.readouterr().out
    run = RunDir(rep.path)
    state = run.read_state()
    assert state["status"] == "cancelled"
    assert state["finished"] == ["clean", "victim"]
    assert rep.started[-1] == "stage1"  # stopped inside Stage 1, before any of its steps
    assert not run.cancel_file.exists()  # consumed, so a resume is not cancelled again
    assert run.read_summary()["status"] == "cancelled"
    assert json.loads((run.path / "progress.json").read_text())["status"] == "cancelled"
    assert not run.checkpoint("stage1").exists()
    assert {i["run_id"]: i["status"] for i in list_runs(root)} == {run.run_id: "cancelled"}

    summary = resume_run(find_run(run.run_id, root))
    assert summary["status"] == "done"
    assert numbers(summary) == numbers(micro_run.summary)
    assert _same_weights(run, micro_run.run, "stage2")
    assert run.read_state()["finished"] == micro_run.run.read_state()["finished"]


def test_stop_after_leaves_a_prepared_run_that_resume_finishes_as_if_uninterrupted(micro_run, tmp_path, capsys):
    root = tmp_path / "runs"
    run, summary = start_run(load_config("micro"), runs_root=root, stop_after="victim")
    assert summary["status"] == "prepared" and set(summary["stages"]) == {"victim"}  # the clean model is not a stage row
    assert run.read_state()["finished"] == ["clean", "victim"] and not run.checkpoint("stage1").exists()
    assert json.loads((run.path / "progress.json").read_text())["status"] == "prepared"
    assert {i["run_id"]: i["status"] for i in list_runs(root)} == {run.run_id: "prepared"}
    summary = resume_run(run)
    assert summary["status"] == "done"
    assert numbers(summary) == numbers(micro_run.summary)
    assert _same_weights(run, micro_run.run, "stage2")
    # a baseline's stage: only its lineage runs (Locphylax's stages are left for the resume), and the
    # run still ends as an uninterrupted one
    run, summary = start_run(load_config("micro"), runs_root=root, stop_after="clean_ft/stage2")
    assert run.read_state()["finished"] == ["clean", "victim", "clean_ft/stage1", "clean_ft/stage2"]
    assert summary["status"] == "prepared" and not run.checkpoint("stage1").exists()
    summary = resume_run(run)
    assert numbers(summary) == numbers(micro_run.summary)
    assert _same_weights(run, micro_run.run, "stage2") and _same_weights(run, micro_run.run, "no_cluster/stage2")
    # a stage the run does not have is refused before anything is written
    with pytest.raises(LocphylaxError, match="'stage9' is not a stage of this run"):
        start_run(load_config("micro"), runs_root=tmp_path / "other", stop_after="stage9")
    assert not (tmp_path / "other").exists()
    # the command line, `run` and `demo` (which shares run's arguments)
    assert cli_mod.main(["--runs", str(root), "run", "micro", "--stop-after", "victim", "--no-analyze"]) == 0
    assert "runs the rest" in capsys.readouterr().out
    assert cli_mod.main(["--runs", str(root), "demo", "--stop-after", "stage9"]) == 2
    assert "'stage9' is not a stage of this run" in capsys.readouterr().err


def test_cli_cancel_and_resume_unknown_run(tmp_path, capsys):
    assert cli_mod.main(["--runs", str(tmp_path), "cancel", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert cli_mod.main(["--runs", str(tmp_path), "resume", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_find_run_ambiguous_prefix(tmp_path):
    RunDir.create(tmp_path, "micro", run_id="abc-1")
    RunDir.create(tmp_path, "micro", run_id="abc-2")
    with pytest.raises(RunError, match="ambiguous"):
        find_run("abc", tmp_path)
    assert find_run("abc-2", tmp_path).path == tmp_path / "abc-2"


def test_resume_of_a_run_without_state(tmp_path):
    run = RunDir.create(tmp_path, "micro", run_id="broken")
    with pytest.raises(LocphylaxError, match="config.yaml"):
        resume_run(run)
    assert {i["run_id"]: i["status"] for i in list_runs(tmp_path)} == {"broken": "incomplete (no state.json)"}
