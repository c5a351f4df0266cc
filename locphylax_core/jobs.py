"""Background jobs: a run (and its analysis) in a separate process that writes to its run folder.

The app never trains inside its own process. :func:`launch` starts ``python -m
locphylax_core.jobs`` in a new process session and returns at once; the job is recorded in
``<runs>/.jobs/<run_id>.json`` so any later page load, browser tab or second app process finds
it again (:func:`list_jobs`, :func:`job_status`). :func:`cancel` really stops it: it asks the
pipeline to stop after its current step (the run keeps its finished stages and stays resumable),
and kills the process group if it has not exited within a grace period.

Layout of ``<runs>/.jobs/`` (``list_runs`` skips dot folders)::

    <run_id>.json        the job record: pid, command, started, config file, log file
    <run_id>.yaml        the configuration the job runs
    <run_id>.log         the job's stdout and stderr
    <run_id>.exit.json   written by the job as it ends: return code and phase
    standby/state.json   a warm job process waiting for work (pid, token, ready, prepared)
    standby/go.json      the job handed to it (the arguments of ``main``)
    standby/prepare.json a run it should start ahead of time, up to one stage (:func:`prepare`)

A fresh job process spends seconds importing torch and transformers before it trains anything.
:func:`ensure_standby` starts one ahead of time, while nothing else runs; :func:`launch` hands the
next job to it when it is ready (the job then starts at once) and starts a fresh process otherwise.

:func:`prepare` goes one step further for a job that is likely next (the Live demo's, for the
trigger typed in its box): the waiting standby runs it up to a stage (``victim``: the backdoor is
planted) and keeps the run ``prepared``; a :func:`launch` of the same configuration (equal
:meth:`RunConfig.sha256`) then resumes that run instead of starting from nothing, with the same
results (resume is bit-identical). A prepared run nobody launched is deleted when another
configuration is prepared or launched, and when the standby exits.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .runs import (RunDir, RunFileError, atomic_write_json, atomic_write_text, holder_pid, new_run_id, progress_problem,
                   read_json, state_problem)
from .analysis.representations import warm_up
from .analysis.run_analysis import analyze_run
from .cli import quiet_libraries
from .config import RunConfig, load_config
from .engine import Cancelled
from .errors import LocphylaxError, RunError
from .pipeline import resume_run, start_run

JOBS_DIR = ".jobs"
STANDBY_DIR = "standby"
LIVE_PHASES = ("starting", "training", "analyzing")
STANDBY_IDLE_S = 3600.0  # a standby process nobody used within an hour exits
PREPARE_STAGE = "victim"  # what :func:`prepare` runs ahead of the click: the backdoor is planted
NOTHING_SAVED = "stopped before its run folder was written: nothing was started or saved; start it again"


def jobs_dir(runs_root: str | Path) -> Path:
    return Path(runs_root) / JOBS_DIR


@dataclass(frozen=True)
class JobStatus:
    """What a job is doing now, read from its record, its run folder and its process."""

    run_id: str
    phase: str  # starting | training | analyzing | done | cancelled | failed | stopped | missing
    alive: bool
    stage: str | None = None  # the stage being trained
    step: int = 0
    stage_steps: int = 0
    finished: tuple[str, ...] = ()
    stage_totals: dict = field(default_factory=dict)  # steps per stage key, in run order
    analysis_part: str | None = None
    error: str | None = None
    started: str | None = None
    log_tail: str = ""
    resumable: bool = False  # a run folder exists that `resume` can continue

    @property
    def live(self) -> bool:
        return self.phase in LIVE_PHASES

    @property
    def fraction(self) -> float:
        """Share of all training steps done (analysis counts as the last 10%)."""
        if self.phase == "done":
            return 1.0
        total = sum(self.stage_totals.values())
        if not total:
            return 0.0
        done = sum(v for k, v in self.stage_totals.items() if k in self.finished)
        if self.stage and self.stage not in self.finished:
            done += min(self.step, self.stage_totals.get(self.stage, 0))
        return 0.9 * done / total + (0.05 if self.phase == "analyzing" else 0.0)


def _pid_alive(pid: int, token: str) -> bool:
    """True when ``pid`` runs and is our job (its command line holds the run id), not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            return token in proc.joinpath("cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            return False
    return True


def launch(cfg: RunConfig, runs_root: str | Path = "runs", *, analyze: bool = True, resume: str | None = None,
           threads: int | None = None) -> str:
    """Start a run (or resume the run ``resume``) in a separate process; return its run id at once.

    When other jobs are live, the new one gets one torch thread (two processes with a full thread
    count each on a small CPU slow both by an order of magnitude) unless ``threads`` is given."""
    root = Path(runs_root)
    jd = jobs_dir(root)
    try:
        jd.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"runs folder {root}: cannot write its job records ({e.strerror or e})") from None
    if resume:
        holder = holder_pid(root / resume)
        if holder is not None or job_status(root, resume, log=False).live:
            # a second process on one run would interleave its files, and this job's record would
            # replace the live one's (so Cancel would stop only the second)
            raise RunError(f"run {resume} is live (held by process {holder or 'starting'}); cancel it or wait "
                           "for it to end before resuming it")
    if threads is None and any(j.live for j in list_jobs(root)):
        threads = 1
    if threads is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": int(threads)})})
    standby = _claim_standby(root)
    held = (standby or {}).get("rec", {}).get("prepared")
    use_prepared = not resume and held is not None and held.get("sha256") == cfg.sha256()
    run_id = held["run_id"] if use_prepared else (resume or new_run_id(cfg.name))
    cfg_path = jd / f"{run_id}.yaml"
    log_path = jd / f"{run_id}.log"
    try:
        atomic_write_text(cfg_path, cfg.to_yaml())  # also marks the run as launched: it is never discarded
    except BaseException:
        if standby is not None:  # give the standby back, untouched
            os.replace(standby["claimed"], _standby_dir(root) / "state.json")
        raise
    if held is not None and not use_prepared and not held.get("done"):
        _stop_preparing(root, held["run_id"])  # another configuration: the standby drops it and takes this job
    (jd / f"{run_id}.exit.json").unlink(missing_ok=True)  # a resumed job's old ending
    argv = ["--runs", str(root.resolve()), "--run-id", run_id, "--config", str(cfg_path.resolve())]
    if not analyze:
        argv.append("--no-analyze")
    if resume or use_prepared:
        argv.append("--resume")
    record = {"run_id": run_id, "started": _dt.datetime.now().isoformat(timespec="seconds"),
              "config": str(cfg_path), "log": str(log_path), "resume": bool(resume), "prepared": use_prepared}
    warm = _hand_to_standby(root, standby, argv, log_path) if standby is not None else None
    if warm is not None:
        atomic_write_json(jd / f"{run_id}.json", {**record, **warm})
        return run_id
    cmd = [sys.executable, "-m", "locphylax_core.jobs", *argv]
    with open(log_path, "ab") as log:
        proc = _spawn(cmd, log, root)
    atomic_write_json(jd / f"{run_id}.json", {**record, "pid": proc.pid, "command": cmd})
    return run_id


def _spawn(cmd: list[str], log, runs_root: Path) -> subprocess.Popen:
    """Start a job (or standby) process in a session of its own (a cancel stops its whole group),
    bound to this process's lifetime: it is told our pid (``--parent``: it ends when we are gone,
    however we went) and it is ended at our exit (:func:`_end_children`)."""
    # numba's compiled UMAP kernels are cached in the run store, so only the first job ever pays the
    # tens of seconds of compilation
    env = {"NUMBA_CACHE_DIR": str((jobs_dir(runs_root) / "numba-cache").resolve()), **os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, "--parent", str(os.getpid())], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=os.getcwd())
    # reap the child when it ends, so it never lingers as a zombie that looks alive
    threading.Thread(target=proc.wait, daemon=True).start()
    with _CHILDREN_LOCK:
        if not _CHILDREN:
            atexit.register(_end_children)
        _CHILDREN.append(proc)
    return proc


# ----------------------------------------------------------------------------------------------
# No process outlives what started it: the app's server (or any process that launches jobs)
# ends its job processes when it exits, and each job process watches its parent and ends when it
# is gone (a SIGKILL of the server, a closed terminal). Ending is a cancel: the run keeps its
# finished stages and can be resumed.

_CHILDREN: list[subprocess.Popen] = []
_CHILDREN_LOCK = threading.Lock()
END_GRACE_S = 10.0  # how long an ended job may take to write its state before it is killed
PARENT_GONE = "stopped: the app (or process) that started this job ended; resume it to go on"


def _end_children(grace: float = END_GRACE_S) -> None:
    """At this process's exit: stop every job or standby process it started that still runs, with
    its process group (a standby's warm-up): SIGHUP first (a job stops as a cancel stops it, saying
    why: :data:`PARENT_GONE`) and SIGKILL after ``grace`` seconds."""
    with _CHILDREN_LOCK:
        live = [p for p in _CHILDREN if p.returncode is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGHUP)
    deadline = time.monotonic() + grace
    while any(p.returncode is None for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in live:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)


def _end_with_parent(parent: int, grace: float = END_GRACE_S) -> None:
    """In a job, standby or warm-up process: a thread that ends this process once ``parent`` (the
    process that started it) is gone: SIGHUP (a job stops as a cancel stops it and keeps its
    finished stages; to the whole group when we lead one: a standby's warm-up with it), then
    SIGKILL after ``grace``."""
    def watch() -> None:
        while os.getppid() == parent:  # once the parent is gone, the process is someone else's child
            time.sleep(0.25)
        leader = os.getpgrp() == os.getpid()
        for sig in (signal.SIGHUP, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpid(), sig) if leader else os.kill(os.getpid(), sig)
            time.sleep(grace)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


# ----------------------------------------------------------------------------------------------
# A warm standby process


def _standby_dir(runs_root: str | Path) -> Path:
    return jobs_dir(runs_root) / STANDBY_DIR


def _live_standby(runs_root: str | Path) -> dict | None:
    """The standby's record while its process runs (importing or ready), else None."""
    rec = _read(_standby_dir(runs_root) / "state.json")
    return rec if rec and _pid_alive(int(rec["pid"]), rec["token"]) else None


def standby_alive(runs_root: str | Path) -> bool:
    """A standby process runs (still importing, waiting, or preparing a run)."""
    return _live_standby(runs_root) is not None


def standby_ready(runs_root: str | Path) -> bool:
    """A standby waits with everything a job needs imported and UMAP compiled (``warm``)."""
    rec = _live_standby(runs_root)
    return bool(rec and rec.get("ready") and rec.get("warm"))


def ensure_standby(runs_root: str | Path) -> bool:
    """Start a standby job process unless one is waiting already or a job is running (importing
    torch would take CPU from it). True when one is waiting or starting."""
    root = Path(runs_root)
    sd = _standby_dir(root)
    if _live_standby(root) is not None:
        return True
    if any(j.live for j in list_jobs(root)):
        return False
    sd.mkdir(parents=True, exist_ok=True)
    token = f"standby-{secrets.token_hex(6)}"
    with open(sd / "standby.log", "ab") as log:
        proc = _spawn([sys.executable, "-m", "locphylax_core.jobs", "--runs", str(root.resolve()),
                       "--standby", token], log, root)
    atomic_write_json(sd / "state.json", {"pid": proc.pid, "token": token, "ready": False,
                                          "started": _dt.datetime.now().isoformat(timespec="seconds")})
    return True


def stop_standby(runs_root: str | Path) -> bool:
    """Retire the run store's idle standby (it and its warm-up exit within moments), e.g. when the
    app that started it stops. A standby that has taken a job is that job now and is left alone.
    True when one was retired."""
    sd = _standby_dir(runs_root)
    if _live_standby(runs_root) is None:
        return False
    retired = sd / f"retired-{secrets.token_hex(4)}.json"
    try:
        os.rename(sd / "state.json", retired)  # atomic against a launcher claiming it at this moment
    except OSError:
        return False
    retired.unlink(missing_ok=True)
    return True


def prepare(cfg: RunConfig, runs_root: str | Path, stop_after: str = PREPARE_STAGE) -> str | None:
    """Have the waiting standby run ``cfg`` up to the stage ``stop_after`` now, so that a later
    :func:`launch` of the same configuration starts from there. Returns the id of the run being
    prepared (or prepared already), or None: no ready standby, or a job is running (the work would
    take its CPU). Cheap and idempotent: the app calls it on every page run. Preparing another
    configuration stops and deletes the one prepared before."""
    root = Path(runs_root)
    rec = _live_standby(root)
    if rec is None or not rec.get("ready") or any(j.live for j in list_jobs(root)):
        return None
    sha, sd = cfg.sha256(), _standby_dir(root)
    # the request first, then the state: the standby records a request in its state before it
    # removes the request file, so one of the two reads sees it
    asked = _read(sd / "prepare.json")
    if asked is not None and asked.get("token") == rec["token"] and asked.get("sha256") == sha:
        return asked["run_id"]
    held = (_read(sd / "state.json") or rec).get("prepared")
    if held is not None and held.get("sha256") == sha:
        return held["run_id"]
    if held is not None and not held.get("done"):
        _stop_preparing(root, held["run_id"])
    run_id = new_run_id(cfg.name)
    cfg_path = sd / f"prepare-{run_id}.yaml"
    atomic_write_text(cfg_path, cfg.to_yaml())
    atomic_write_json(sd / "prepare.json", {"token": rec["token"], "run_id": run_id, "config": str(cfg_path.resolve()),
                                            "sha256": sha, "stop_after": stop_after})
    return run_id


def prepared_run(runs_root: str | Path, cfg: RunConfig) -> tuple[str, bool] | None:
    """The run the standby prepares (or has prepared) for ``cfg``, and whether it is ready."""
    rec = _live_standby(runs_root)
    held = (rec or {}).get("prepared")
    if held is None or held.get("sha256") != cfg.sha256():
        return None
    return held["run_id"], bool(held.get("done"))


def _ask_to_stop(run_path: Path) -> None:
    """Ask a run to stop after its current step: the CANCEL file, written only for a run a process
    holds (a stale one would stop a later resume at once)."""
    if holder_pid(run_path) is not None:
        RunDir(run_path).cancel_file.touch()


def _stop_preparing(root: Path, run_id: str, wait: float = 5.0) -> None:
    """Ask the standby's preparing run to stop at its next step (its folder may still be being set
    up: wait for it a few seconds)."""
    run = RunDir(root / run_id)
    deadline = time.monotonic() + wait
    while not run.is_run() and time.monotonic() < deadline:
        time.sleep(0.05)
    if run.is_run():
        _ask_to_stop(run.path)


def _discard_prepared(root: Path, run_id: str) -> None:
    """Delete a run the standby prepared and nobody launched (never one a job was launched for,
    nor one another process holds)."""
    (_standby_dir(root) / f"prepare-{run_id}.yaml").unlink(missing_ok=True)
    path = root / run_id
    if (jobs_dir(root) / f"{run_id}.yaml").exists() or holder_pid(path) is not None:
        return
    if (_read(path / "state.json") or {}).get("status") in ("prepared", "cancelled", "created", "running"):
        shutil.rmtree(path, ignore_errors=True)


def _claim_standby(root: Path) -> dict | None:
    """Take the live standby for one launch (``rec``: its record, ``claimed``: where its state file
    now is), or None."""
    sd = _standby_dir(root)
    rec = _live_standby(root)
    if rec is None:
        return None
    claimed = sd / f"claimed-{secrets.token_hex(4)}.json"
    try:
        os.rename(sd / "state.json", claimed)  # atomic: one launcher gets it
    except OSError:
        return None
    return {"rec": _read(claimed) or rec, "claimed": claimed}


def _hand_to_standby(root: Path, standby: dict, argv: list[str], log_path: Path, wait: float = 3.0) -> dict | None:
    """Give the job to the claimed standby process; its job-record fields, or None (a ready, idle
    one did not take the job in ``wait`` seconds: the caller starts a fresh process). A standby
    still importing, or busy preparing a run, takes the job as soon as it can, which is sooner than
    a fresh process would be."""
    rec, claimed = standby["rec"], standby["claimed"]
    go = _standby_dir(root) / "go.json"
    atomic_write_json(go, {"token": rec["token"], "argv": argv, "log": str(log_path)})
    preparing = rec.get("prepared") is not None and not rec["prepared"].get("done")
    idle = rec.get("ready") and not preparing
    deadline = time.monotonic() + (wait if idle else 0.0)
    while go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    claimed.unlink(missing_ok=True)
    if go.exists() and idle:  # a ready standby did not answer: take the job back
        go.unlink(missing_ok=True)
        return None
    return {"pid": int(rec["pid"]), "token": rec["token"], "command": ["(standby)", *argv], "standby": True}


def _prepare_run(root: Path, asked: dict) -> bool:
    """In the standby: run the asked configuration up to its stage; False (and nothing left) when
    it was stopped or failed (the launch then runs it from the start and reports any error)."""
    run_id = asked["run_id"]
    try:
        quiet_libraries()
        start_run(load_config(asked["config"]), runs_root=root, reporter=_ProgressReporter(root / run_id),
                  run_id=run_id, stop_after=asked["stop_after"])
        return True
    except (Cancelled, KeyboardInterrupt):
        pass
    except Exception:  # noqa: BLE001 - into the standby's log; the launch will report it properly
        import traceback
        traceback.print_exc()
    _discard_prepared(root, run_id)
    return False


@contextlib.contextmanager
def _paused(proc: subprocess.Popen | None):
    """Stop a child process for the duration (SIGSTOP, then SIGCONT): the standby's warm-up yields
    both CPUs to the run it prepares, and goes on while the standby waits."""
    running = proc is not None and proc.poll() is None
    if running:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        if running and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)


def _standby(root: Path, token: str) -> int:
    """The standby process: import what every job needs, say so, wait for a job, become it."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel  # noqa: F401  (most of a job's start)
    sd = _standby_dir(root)
    state, go = sd / "state.json", sd / "go.json"
    # UMAP's compilation in a process of its own (a job can be taken meanwhile), into the cache
    # that this process and the job it becomes then read; paused while a run is prepared and
    # stopped when a job is taken, which need the CPUs first (a job that needs UMAP before the
    # warm-up ended compiles it itself, as a fresh process would)
    # (LOCPHYLAX_WARM_UP=0: skipped, e.g. by the tests, which share one cache)
    warm = os.environ.get("LOCPHYLAX_WARM_UP", "1") == "0"
    warming = None if warm else subprocess.Popen(  # in our process group: a cancel or our end stops it too
        [sys.executable, "-m", "locphylax_core.jobs", "--runs", str(root), "--warm-up", "--parent", str(os.getpid())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    def update(**fields) -> None:  # our state file, unless a launcher has claimed it meanwhile
        rec = _read(state)
        if rec is not None and rec.get("token") == token:
            atomic_write_json(state, {**rec, **fields})

    update(ready=True, warm=warm)
    prepared = None  # the run prepared ahead of a launch: {"run_id", "sha256", "done"}
    deadline = time.monotonic() + STANDBY_IDLE_S
    try:
        while time.monotonic() < deadline:
            if warming is not None and warming.poll() is not None:
                warming = None
                import umap  # noqa: F401  (the job's own import of it, done while nothing runs)
                update(warm=True)
            job = _read(go)
            if job is not None and job.get("token") == token:
                go.unlink(missing_ok=True)
                if prepared is not None and prepared["run_id"] not in job["argv"]:
                    _discard_prepared(root, prepared["run_id"])
                prepared = None  # the job's now, or gone
                log = open(job["log"], "ab")
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                if warming is not None and warming.poll() is None:
                    # the job needs the CPUs; one that needs UMAP compiles what is missing itself, and
                    # numba's cache only ever holds whole files (written aside, then renamed)
                    warming.kill()
                return main(job["argv"])
            asked = _read(sd / "prepare.json")
            if asked is not None and asked.get("token") == token:
                if prepared is not None:
                    _discard_prepared(root, prepared["run_id"])
                prepared = {"run_id": asked["run_id"], "sha256": asked["sha256"], "done": False}
                update(prepared=prepared)  # not done: busy, so a launcher does not wait for an answer
                (sd / "prepare.json").unlink(missing_ok=True)  # after the state says so (see prepare())
                with _paused(warming):
                    ok = _prepare_run(root, asked)
                prepared = {**prepared, "done": True} if ok else None
                update(prepared=prepared)
                continue
            if not state.exists() and not any(sd.glob("claimed-*.json")):  # removed: nobody will hand us a job
                if warming is not None:
                    warming.terminate()
                return 0
            time.sleep(0.05)
        state.unlink(missing_ok=True)
        return 0
    except KeyboardInterrupt:  # SIGHUP: the app that started us ended (or a SIGTERM)
        return 0
    finally:
        if warming is not None and warming.poll() is None:
            warming.terminate()
        if prepared is not None:  # prepared for a launch that never came
            _discard_prepared(root, prepared["run_id"])


def _read(path: Path) -> dict | None:
    """A job record or a run's state / progress, through the run store's safe reader (a named pipe
    or a link to /dev/zero in its place is refused, not read); None when it cannot be read."""
    try:
        v = read_json(path)
        return v if isinstance(v, dict) else None
    except RunFileError:
        return None


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def job_status(runs_root: str | Path, run_id: str, log: bool = True) -> JobStatus:
    """``log``: also read the end of the job's log (``log_tail``)."""
    root = Path(runs_root)
    jd = jobs_dir(root)
    rec = _read(jd / f"{run_id}.json")
    run_path = root / run_id
    if rec is None and not run_path.is_dir():
        return JobStatus(run_id, "missing", False, error=f"no job or run {run_id!r} under {root}")
    alive = bool(rec) and _pid_alive(int(rec.get("pid", -1)), rec.get("token", run_id))
    state = _read(run_path / "state.json") or {}
    state = {} if state_problem(state) else state  # a damaged run: its job's outcome alone is shown
    progress = _read(run_path / "progress.json") or {}
    progress = {} if progress_problem(progress) else progress
    exit_rec = _read(jd / f"{run_id}.exit.json")
    totals = state.get("total_steps") or {}
    finished = tuple(state.get("finished", []))
    status = state.get("status")
    error = state.get("error") or progress.get("error")
    if alive:
        if not run_path.is_dir() or not state:
            phase = "starting"
        elif progress.get("status") == "analyzing" or (progress.get("status") == "done" and status == "done"):
            # the pipeline has finished; the analyses run (or the process is writing its last files)
            phase = "analyzing"
        else:
            phase = "training"
    elif exit_rec is not None:
        phase = exit_rec.get("phase", "failed")
        error = error or exit_rec.get("error")
    elif status in ("done", "cancelled", "failed"):
        phase = status
    else:  # the process is gone without an exit record: killed from outside (or the machine stopped)
        phase = "stopped"
        error = error or "the job's process is gone (killed?); the run can be resumed from its last finished stage"
    resumable = RunDir(run_path).is_run()
    if not alive and not resumable and phase in ("cancelled", "stopped"):
        error = NOTHING_SAVED  # never "can be resumed" when there is no run folder to resume
    return JobStatus(run_id=run_id, phase=phase, alive=alive, stage=progress.get("key"),
                     step=int(progress.get("step") or 0), stage_steps=int(totals.get(progress.get("key"), 0) or 0),
                     finished=finished, stage_totals=dict(totals), analysis_part=progress.get("part"),
                     error=error, started=(rec or {}).get("started"),
                     log_tail=_tail(jd / f"{run_id}.log") if rec and log else "", resumable=resumable)


def list_jobs(runs_root: str | Path) -> list[JobStatus]:
    """Every job recorded under ``runs_root``, newest first (without log tails: the app lists jobs
    every poll)."""
    jd = jobs_dir(runs_root)
    if not jd.is_dir():
        return []
    ids = sorted((p.name[:-5] for p in jd.glob("*.json") if not p.name.endswith(".exit.json")), reverse=True)
    return [job_status(runs_root, i, log=False) for i in ids]


def cancel(runs_root: str | Path, run_id: str, grace: float = 10.0) -> JobStatus:
    """Stop a job: ask the pipeline to stop after its current step (CANCEL file and SIGTERM, both of
    which leave a resumable run marked ``cancelled``), then kill its process group if it is still
    there after ``grace`` seconds. Returns the status afterwards."""
    root = Path(runs_root)
    rec = _read(jobs_dir(root) / f"{run_id}.json")
    run_path = root / run_id
    _ask_to_stop(run_path)
    token = (rec or {}).get("token", run_id)
    if rec is not None and _pid_alive(int(rec["pid"]), token):
        pid = int(rec["pid"])
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _pid_alive(pid, token):
            time.sleep(0.1)
        if _pid_alive(pid, token):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _pid_alive(pid, token):
                time.sleep(0.05)
            _write_exit(root, run_id, 137, "cancelled", "killed after the grace period")
        if not (jobs_dir(root) / f"{run_id}.exit.json").exists():
            # SIGTERM before the job process could catch it (it was still importing): it wrote nothing
            _write_exit(root, run_id, 143, "cancelled", None if RunDir(run_path).is_run() else NOTHING_SAVED)
    return job_status(root, run_id)


def _write_exit(root: Path, run_id: str, rc: int, phase: str, error: str | None = None) -> None:
    atomic_write_json(jobs_dir(root) / f"{run_id}.exit.json",
                      {"rc": rc, "phase": phase, "error": error,
                       "ended": _dt.datetime.now().isoformat(timespec="seconds")})


class _ProgressReporter:
    """Writes the current step to progress.json, at most twice a second (the observer writes it at
    every evaluation point too; this adds the steps in between)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.key, self.step, self.last = run_dir, None, 0, 0.0

    def stage_started(self, key, total_steps):
        self.key, self.step = key, 0
        self._write(force=True)

    def advance(self, n, logs):
        self.step += n
        self._write()

    def stage_finished(self, key, result):
        pass

    def message(self, text):
        print(text, flush=True)

    def _write(self, force: bool = False):
        now = time.monotonic()
        if (force or now - self.last > 0.5) and self.run_dir.is_dir():
            self.last = now
            RunDir(self.run_dir).write_progress(status="running", key=self.key, step=self.step)


def _sigterm(_signo, _frame):
    raise KeyboardInterrupt("stopped by a cancel request")


def _sighup(_signo, _frame):  # what _end_children and _end_with_parent send
    raise KeyboardInterrupt(PARENT_GONE)


def main(argv: list[str] | None = None) -> int:
    """The job process: run (or resume) the pipeline, then the analyses, writing progress as it goes."""
    ap = argparse.ArgumentParser(prog="python -m locphylax_core.jobs")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--standby", metavar="TOKEN", help="wait, warm, for a job handed over by launch()")
    ap.add_argument("--run-id")
    ap.add_argument("--config")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-analyze", action="store_true")
    ap.add_argument("--warm-up", action="store_true", help="compile the analyses' numba kernels, then exit")
    ap.add_argument("--parent", type=int, metavar="PID", help="end when this process (the one that started us) is gone")
    args = ap.parse_args(argv)
    if args.parent is not None:
        _end_with_parent(args.parent)
    if args.warm_up:
        warm_up()
        return 0
    if not args.standby and not (args.run_id and args.config):
        ap.error("--run-id and --config are required (or --standby)")
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sighup)
    if args.standby:
        try:
            return _standby(Path(args.runs), args.standby)
        except KeyboardInterrupt:  # stopped while still importing
            return 0
    root = Path(args.runs)
    quiet_libraries()
    run_dir = root / args.run_id
    reporter = _ProgressReporter(run_dir)
    phase, rc, error = "failed", 1, None
    try:
        if args.resume:
            resume_run(RunDir(run_dir), reporter=reporter)
        else:
            start_run(load_config(args.config), runs_root=root, reporter=reporter, run_id=args.run_id)
        if not args.no_analyze:
            run = RunDir(run_dir)

            def say(part: str) -> None:
                print(f"analysis: {part}", flush=True)
                run.write_progress(status="analyzing", part=part)
            analyze_run(run, progress=say)
            run.write_progress(status="done", part=None)
        phase, rc = "done", 0
    except (Cancelled, KeyboardInterrupt) as e:
        phase, rc, error = "cancelled", 130, str(e) or "cancelled"
        if RunDir(run_dir).is_run():
            RunDir(run_dir).write_progress(status="cancelled")
        else:
            error = NOTHING_SAVED
    except LocphylaxError as e:
        phase, rc, error = "failed", 2, str(e)
        print(f"error: {e}", flush=True)
    except Exception as e:  # noqa: BLE001 - reported to the app, with the traceback in the log
        import traceback
        traceback.print_exc()
        phase, rc, error = "failed", 1, f"{type(e).__name__}: {e}"
    finally:
        _write_exit(root, args.run_id, rc, phase, error)
    return rc


if __name__ == "__main__":
    sys.exit(main())
