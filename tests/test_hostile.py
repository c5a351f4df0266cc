"""A hostile user against the CLI, the run store and the job layer: the 14 faults of issue 17.

Each test's docstring names the fault it guards. Runs are copies of the session's finished micro
run (tests/conftest.py) with the last stage undone, so a resume trains one small stage only.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env, cli_in_process, read_jsonl
from locphylax_core import jobs, load_config, resume_run, start_run
from locphylax_core import model as M
from locphylax_core import runview as R
from locphylax_core.config import MAX_STEPS
from locphylax_core.errors import ConfigError, ModelLoadError, RunError
from locphylax_core.runs import SETUP_PREFIX, RunDir, RunLock, holder_pid, list_runs

BINARY = bytes(range(256)) * 4  # not UTF-8


def _partial_copy(micro_run, root: Path, name: str = "partial") -> RunDir:
    """A copy of the finished micro run with its last stage undone (as if killed during it)."""
    dst = root / name
    shutil.copytree(micro_run.path, dst, ignore=shutil.ignore_patterns(".lock", "analysis*"))
    run = RunDir(dst)
    state = run.read_state()
    last = state["finished"].pop()
    state["status"] = "running"
    state["results"].pop(last)
    run.write_state(state)
    shutil.rmtree(run.checkpoint(last))
    run.hidden(last).unlink()
    return run



# ----------------------------------------------------------------------------------------------
# 1, 12, 11: configuration


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """Fault 1: a YAML "billion laughs" config hung for over 60 s in 2.6 GB; it is refused in well
    under a second, and no error message reprs an unbounded input."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nattack: {trigger: *a9}\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_config(bomb)
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path / "runs"), "run", str(bomb), "--dry-run")
    assert time.perf_counter() - t0 < 5
    assert rc == 2 and "aliases expand" in out and "Traceback" not in out
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("attack: &x {trigger: *x}\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_config(recursive)
    # a large (but not bomb) wrong value: the message shows a bounded excerpt of it
    big = tmp_path / "big.yaml"
    big.write_text("attack: {trigger: [" + ",".join(["123456789"] * 6000) + "]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(big)
    assert "attack.trigger" in str(e.value) and len(str(e.value)) < 1500


def test_empty_override_is_an_error_naming_the_field(tmp_path, capsys):
    """Fault 12: `--set attack.trigger=` (empty) silently meant the family's default trigger."""
    with pytest.raises(ConfigError, match=r"--set attack\.trigger: no value"):
        load_config("micro", ["attack.trigger="])
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path), "run", "micro", "--set", "attack.trigger=", "--dry-run")
    assert rc == 2 and "attack.trigger" in out and "no value" in out
    assert load_config("micro", ["attack.trigger=null"]).attack.trigger_text == "cf"  # the explicit default


@pytest.mark.parametrize("field", ["attack.steps", "attack.edit_steps", "defense.stage1_steps",
                                   "defense.stage2_steps", "train.clean_steps", "train.warmup_steps",
                                   "eval.every", "eval.clean_every"])
def test_step_counts_have_an_upper_bound(field):
    """Fault 11: step counts had no upper bound (`attack.steps=10**12` was accepted)."""
    with pytest.raises(ConfigError) as e:
        load_config("micro", {field: 10 ** 12})
    assert field in str(e.value) and f"{MAX_STEPS}" in str(e.value)
    assert load_config("micro", {field: MAX_STEPS if field != "train.warmup_steps" else 10})


# ----------------------------------------------------------------------------------------------
# 2, 3, 4: damaged files


def test_binary_files_give_clear_errors(micro_run, tmp_path, capsys):
    """Fault 2: a binary config, state.json, summary.json or config.yaml gave a UnicodeDecodeError
    traceback; one bad state.json broke `locphylax runs` for every run; runview.open_run raised on a
    binary config.yaml."""
    cfg = tmp_path / "binary.yaml"
    cfg.write_bytes(BINARY)
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path), "run", str(cfg), "--dry-run")
    assert rc == 2 and "not a text file" in out and "Traceback" not in out

    root = tmp_path / "runs"
    root.mkdir()
    good = shutil.copytree(micro_run.path, root / "good")
    for name in ("state.json", "summary.json", "config.yaml"):
        bad = shutil.copytree(micro_run.path, root / f"bad-{name}")
        (bad / name).write_bytes(BINARY)
    listed = {i["run_id"]: i["status"] for i in list_runs(root)}
    assert listed["good"] == "done" and listed["bad-state.json"] == "corrupt (state.json unreadable)"
    rc, out = cli_in_process(capsys, "--runs", str(root), "runs")
    assert rc == 0 and "good" in out and "corrupt" in out
    rc, out = cli_in_process(capsys, "--runs", str(root), "show", "bad-summary.json")
    assert rc == 2 and "summary.json: corrupt (not UTF-8" in out
    for name in ("state.json", "config.yaml"):
        rc, out = cli_in_process(capsys, "--runs", str(root), "resume", f"bad-{name}", "--no-analyze")
        assert rc == 2 and name in out and "Traceback" not in out, out
    view = R.open_run(root / "bad-config.yaml")
    assert view.health == "corrupt" and any("config.yaml is corrupt (" in p and "not a text file" in p
                                            for p in view.problems), view.problems
    assert R.open_run(good).health == "done"


def test_metrics_line_that_is_not_an_object_does_not_crash_resume(micro_run, tmp_path):
    """Fault 3: a metrics.jsonl line that is valid JSON but not an object (`[1,2,3]`) crashed
    `resume`."""
    run = _partial_copy(micro_run, tmp_path)
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write("[1, 2, 3]\n42\n\"text\"\n")
    summary = resume_run(run)
    assert summary["status"] == "done"
    rows = read_jsonl(run.path / "metrics.jsonl")
    assert all(isinstance(r, dict) for r in rows)
    assert len(rows) == len(read_jsonl(micro_run.path / "metrics.jsonl"))


@pytest.mark.parametrize("summary,problem", [
    ({"schema": 1}, "run_id is missing"),
    ({"schema": 1, "run_id": "x", "stages": {"victim": {"cacc": "high", "asr": {}}}, "baselines": {}},
     "stages.victim.cacc"),
    ({"schema": 1, "run_id": "x", "stages": {"victim": {"cacc": 0.5}}, "baselines": {}}, "stages.victim.asr"),
    ({"schema": 1, "run_id": "x", "stages": [], "baselines": {}}, "stages is missing or not a mapping"),
    ({"schema": 1, "run_id": "x", "stages": {}, "baselines": {}, "seconds": {"victim": "slow"}},
     "seconds.victim is not a number"),
])
def test_summary_of_schema_1_with_the_wrong_shape(micro_run, tmp_path, capsys, summary, problem):
    """Fault 4: a summary.json with schema 1 but the wrong shape gave KeyError / ValueError
    tracebacks."""
    dst = shutil.copytree(micro_run.path, tmp_path / "r")
    (dst / "summary.json").write_text(json.dumps(summary))
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path), "show", "r")
    assert rc == 2 and f"summary.json: corrupt ({problem}" in out, out
    view = R.open_run(dst)
    assert view.summary is None and any(problem in p for p in view.problems), view.problems
    R.results_table(view)  # never raises


# ----------------------------------------------------------------------------------------------
# 5: folders that cannot be written


@pytest.fixture()
def refuse_writes(monkeypatch):
    """Make folders read-only (chmod 555). Under root, where the OS lets every write through, the
    calls that create files refuse inside them with EACCES, as the kernel would for a user."""
    refused: list[Path] = []

    def inside(path) -> bool:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError):
            return False
        return any(p == r or r in p.parents for r in refused)

    if os.geteuid() == 0:
        real_open, real_mkdir, real_mkstemp = os.open, os.mkdir, tempfile.mkstemp

        def guarded_open(path, flags, *a, **kw):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real_open(path, flags, *a, **kw)

        def guarded_mkdir(path, *a, **kw):
            if inside(Path(os.fsdecode(path)).parent):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real_mkdir(path, *a, **kw)

        def guarded_mkstemp(*a, dir=None, **kw):
            if dir is not None and inside(dir):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(dir))
            return real_mkstemp(*a, dir=dir, **kw)

        monkeypatch.setattr(os, "open", guarded_open)
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)
        monkeypatch.setattr(tempfile, "mkstemp", guarded_mkstemp)
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (mode & os.W_OK and inside(path)))

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        refused.append(folder.resolve())
        return folder

    yield make
    for folder in refused:
        folder.chmod(0o755)


def test_unwritable_places_give_one_line_errors(micro_run, tmp_path, capsys, refuse_writes):
    """Fault 5: a read-only runs folder, `--runs` naming a file, or resuming in a read-only run
    folder gave PermissionError / FileExistsError tracebacks."""
    a_file = tmp_path / "runs.txt"
    a_file.write_text("not a folder")
    rc, out = cli_in_process(capsys, "--runs", str(a_file), "run", "micro", "--no-analyze")
    assert rc == 2 and "is a file, not a folder" in out and "Traceback" not in out
    run = _partial_copy(micro_run, tmp_path / "store")
    read_only_root = refuse_writes(tmp_path / "store")
    t0 = time.perf_counter()
    rc, out = cli_in_process(capsys, "--runs", str(read_only_root), "run", "micro", "--no-analyze")
    assert rc == 2 and "is not writable" in out and "Traceback" not in out, out
    assert time.perf_counter() - t0 < 5  # refused before any preparation
    refuse_writes(run.path)
    rc, out = cli_in_process(capsys, "--runs", str(read_only_root), "resume", run.run_id, "--no-analyze")
    assert rc == 2 and "is not writable" in out and run.run_id in out and "Traceback" not in out, out
    assert run.read_state()["status"] == "running"  # untouched


# ----------------------------------------------------------------------------------------------
# 6, 7: cancel and the run lock


def _hold(run: RunDir) -> subprocess.Popen:
    """Another process holding the run's lock as RunLock does (flock on .lock, its pid inside),
    without importing the library (seconds of torch import saved)."""
    code = ("import fcntl, os, sys, time; fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, str(os.getpid()).encode()); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.path)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_cancel_only_a_running_run_of_the_store(micro_run, tmp_path, capsys):
    """Fault 6: `locphylax cancel` on any folder (not a run, or outside the runs folder) answered rc 0
    and wrote a CANCEL file there; a cancel after its run was killed made the next resume stop at
    once."""
    root = tmp_path / "runs"
    (root / "not-a-run").mkdir(parents=True)
    rc, out = cli_in_process(capsys, "--runs", str(root), "cancel", "not-a-run")
    assert rc == 2 and "is not a run folder" in out and not (root / "not-a-run" / "CANCEL").exists()
    outside = shutil.copytree(micro_run.path, tmp_path / "elsewhere")
    rc, out = cli_in_process(capsys, "--runs", str(root), "cancel", str(outside))
    assert rc == 2 and "is not in the runs folder" in out and not (outside / "CANCEL").exists()
    run = _partial_copy(micro_run, root)  # killed during its last stage: no process holds it
    rc, out = cli_in_process(capsys, "--runs", str(root), "cancel", run.run_id)
    assert rc == 2 and "is not running" in out and not run.cancel_file.exists()
    holder = _hold(run)
    try:
        rc, out = cli_in_process(capsys, "--runs", str(root), "cancel", run.run_id)
        assert rc == 0 and run.cancel_file.exists()  # a held run is asked to stop
    finally:
        holder.kill()
        holder.wait()
    # the holder died before reading the request: the stale CANCEL must not stop the resume
    assert resume_run(run)["status"] == "done"
    assert not run.cancel_file.exists()


def test_one_process_holds_a_run(micro_run, tmp_path, capsys):
    """Fault 7: two resumes of one run at once both ran (62 metrics rows instead of 33), and
    jobs.launch(resume=RUN) while RUN was live overwrote its job record. The run's lock refuses a
    second holder, naming the run and the holder's pid, and the OS releases it when the holder dies."""
    root = tmp_path / "runs"
    run = _partial_copy(micro_run, root)
    rows_before = len(read_jsonl(run.path / "metrics.jsonl"))
    holder = _hold(run)
    try:
        assert holder_pid(run.path) == holder.pid
        with pytest.raises(RunError, match=f"run {run.run_id} is held by another process \\(pid {holder.pid}\\)"):
            resume_run(run)
        rc, out = cli_in_process(capsys, "--runs", str(root), "resume", run.run_id, "--no-analyze")
        assert rc == 2 and f"pid {holder.pid}" in out
        record = jobs.jobs_dir(root) / f"{run.run_id}.json"
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"run_id": run.run_id, "pid": holder.pid, "token": "locphylax_core"}))
        with pytest.raises(RunError, match=f"run {run.run_id} is live"):
            jobs.launch(load_config("micro"), root, resume=run.run_id, analyze=False)
        assert json.loads(record.read_text())["pid"] == holder.pid  # the live job's record is kept
        assert len(read_jsonl(run.path / "metrics.jsonl")) == rows_before  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert holder_pid(run.path) is None  # released by the OS with the killed holder
    with RunLock(run.path):  # and in-process: one holder at a time, released on exit
        with pytest.raises(RunError, match=f"pid {os.getpid()}"):
            RunLock(run.path).acquire()
    assert holder_pid(run.path) is None


# ----------------------------------------------------------------------------------------------
# 8, 13, 14: interruptions


def test_kill_during_set_up_leaves_no_half_run_and_resume_cleans_temporaries(micro_run, tmp_path):
    """Fault 8: a kill while the run folder was set up (config, tokenizer, probe set, first state)
    left a folder that could not be resumed; temporary folders of interrupted checkpoint writes
    survived a successful resume."""
    root = tmp_path / "runs"
    code = ("import os, signal, sys; from locphylax_core import model as M, load_config, start_run\n"
            "M.save_tokenizer = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "start_run(load_config('micro'), runs_root=sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, env=cli_env(), timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(list_runs(root)) == []  # no run folder, so none that cannot be resumed
    left = [p for p in root.iterdir() if p.name.startswith(SETUP_PREFIX)]
    assert len(left) == 1 and (left[0] / "config.yaml").is_file()  # killed after the config was written
    old = time.time() - 3600
    os.utime(left[0], (old, old))
    RunDir.create(root, "micro")  # the next create removes the dead set-up
    assert not any(p.name.startswith(SETUP_PREFIX) for p in root.iterdir())

    run = _partial_copy(micro_run, root)
    half = run.path / "checkpoints" / ".no_cluster__stage2.k3j9x1"  # as write_folder_atomically names it
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    (run.path / ".state.json.abc123").write_text("{")
    (run.path / "hidden" / ".no_cluster__stage2.safetensors.tmp").write_bytes(b"x")
    assert resume_run(run)["status"] == "done"
    leftovers = [p for d in (run.path, run.path / "checkpoints", run.path / "hidden")
                 for p in d.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []


def test_sigterm_marks_the_run_cancelled(tmp_path, capsys):
    """Fault 13: SIGTERM left state.json at "running" forever; it now stops the run as a cancel does
    (status cancelled, resumable). The signal is real, sent to this process while `locphylax run`
    trains in it (the CLI's handler is installed for the command and removed after it)."""
    root = tmp_path / "runs"
    sent = threading.Event()

    def terminate_once_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for state in root.glob("*/state.json"):
                try:
                    if json.loads(state.read_text()).get("status") == "running":
                        sent.set()
                        os.kill(os.getpid(), signal.SIGTERM)
                        return
                except ValueError:
                    pass
            time.sleep(0.02)

    class NotHandledByTheCli(Exception):
        pass

    def fallback(_signo, _frame):  # without the CLI's handler the signal would end the test process
        raise NotHandledByTheCli("SIGTERM reached the test's fallback handler")

    before = signal.signal(signal.SIGTERM, fallback)
    watcher = threading.Thread(target=terminate_once_training, daemon=True)
    watcher.start()
    try:
        rc, out = cli_in_process(capsys, "--runs", str(root), "run", "micro", "--no-analyze",
                       "--set", "train.clean_steps=20000", "--set", "eval.clean_every=50")
        watcher.join(5)
        assert signal.getsignal(signal.SIGTERM) is fallback  # the CLI's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, before)
    assert sent.is_set() and rc == 130, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    (run_path,) = root.glob("*/state.json")
    run = RunDir(run_path.parent)
    assert run.read_state()["status"] == "cancelled"
    assert json.loads((run.path / "progress.json").read_text())["status"] == "cancelled"
    assert holder_pid(run.path) is None and run.is_run()


def test_cancel_in_the_first_moments_says_nothing_was_saved(tmp_path):
    """Fault 14: cancelling a job in its first ~1.6 s reported "can be resumed" although no run
    folder existed yet."""
    run_id = jobs.launch(load_config("micro"), tmp_path, analyze=False)
    s = jobs.cancel(tmp_path, run_id, grace=15)
    assert not s.alive and s.phase == "cancelled", s
    assert not (tmp_path / run_id).exists()
    assert not s.resumable and "nothing was started or saved" in (s.error or "")
    assert "resumed" not in (s.error or "")
    again = jobs.job_status(tmp_path, run_id)  # as the app reads it later
    assert again.phase == "cancelled" and not again.resumable and "nothing was" in again.error


# ----------------------------------------------------------------------------------------------
# 9, 10: checkpoints that do not fit their config


def _gpt2_folder(folder: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400, n_positions=64)).save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def _hf_run_fails(folder: Path, tmp_path: Path) -> str:
    cfg = load_config("micro", ["model.source=hf", f"model.name_or_path={folder}"])
    with pytest.raises(ModelLoadError) as e:
        start_run(cfg, runs_root=tmp_path / "runs")
    assert not any((tmp_path / "runs").iterdir())
    return str(e.value)


def test_missing_or_unexpected_weights_are_an_error_naming_them(tmp_path):
    """Fault 9: an HF folder whose safetensors lacked 15 of 16 tensors loaded with no warning and
    random weights for the missing ones."""
    from safetensors.torch import save_file
    folder = tmp_path / "gpt2"
    weights = _gpt2_folder(folder)
    assert M.load_causal_lm(str(folder)) is not None  # the whole checkpoint loads
    kept = "transformer.wte.weight"
    save_file({kept: weights[kept]}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    msg = _hf_run_fails(folder, tmp_path)
    assert "weight(s) missing from the checkpoint" in msg and "transformer.h.0.attn.c_attn.weight" in msg
    assert "15 weight(s) missing" in msg and "transformer.wpe.weight" in msg and kept not in msg
    save_file({**weights, "transformer.h.9.mlp.c_fc.weight": torch.zeros(2)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    msg = _hf_run_fails(folder, tmp_path)
    assert "1 weight(s) the model does not have (transformer.h.9.mlp.c_fc.weight)" in msg


def test_wrong_tensor_shapes_are_named_with_both_shapes(tmp_path, capsys):
    """Fault 10: wrong tensor shapes gave "look at the above report!" while the CLI hid that report."""
    from safetensors.torch import save_file
    folder = tmp_path / "gpt2"
    weights = _gpt2_folder(folder)
    save_file({**weights, "transformer.h.0.mlp.c_fc.weight": torch.zeros(5, 5)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    msg = _hf_run_fails(folder, tmp_path)
    assert "look at the above report" not in msg
    assert "transformer.h.0.mlp.c_fc.weight (checkpoint (5, 5), model expects (32, 128))" in msg
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path / "runs"), "run", "micro", "--no-analyze",
                   "--set", "model.source=hf", "--set", f"model.name_or_path={folder}")
    assert rc == 2 and "model expects (32, 128)" in out
