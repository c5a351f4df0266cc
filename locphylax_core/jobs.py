"""Background jobs, the client side: start, watch and cancel a run (and its analysis) in a separate
process that writes to its run folder. This is what the app and scripts call.

The app never trains inside its own process. :func:`launch` starts ``python -m
locphylax_core.worker`` (:mod:`locphylax_core.worker`, the job process) in a new process session and
returns at once; the job is recorded in ``<runs>/.jobs/<run_id>.json`` so any later page load,
browser tab or second app process finds it again (:func:`list_jobs`, :func:`job_status`).
:func:`cancel` really stops it: it asks the pipeline to stop after its current step (the run keeps
its finished stages and stays resumable), and kills the process group if it has not exited within a
grace period.

Layout of ``<runs>/.jobs/`` (``list_runs`` skips dot folders)::

    <run_id>.json        the job record: pid, command, started, config file, log file
    <run_id>.yaml        the configuration the job runs
    <run_id>.log         the job's stdout and stderr
    <run_id>.exit.json   written by the job as it ends: return code and phase
    standby/             a warm job process waiting for work (:mod:`locphylax_core.standby`)

A fresh job process spends seconds importing torch and transformers before it trains anything.
:func:`ensure_standby` starts one ahead of time, while nothing else runs; :func:`launch` hands the
next job to it when it is ready (the job then starts at once) and starts a fresh process otherwise.

:func:`prepare` goes one step further for a job that is likely next (the Live demo's, for the
trigger typed in its box): the waiting standby runs it up to a stage (``victim``: the backdoor is
planted) and keeps the run ``prepared``; a :func:`launch` of the same configuration (equal
:meth:`RunConfig.sha256`) then resumes that run instead of starting from nothing, with the same
results (resume is bit-identical). A prepared run nobody launched is deleted when another
configuration is prepared or launched, and when the standby exits. The protocol is
:mod:`locphylax_core.standby`'s; its functions the app calls are here too (:func:`standby_alive`,
:func:`standby_ready`, :func:`stop_standby`, :func:`prepared_run`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import standby as S
from .config import RunConfig
from .errors import RunError
from .runs import (JOBS_DIR, RunDir, atomic_write_json, atomic_write_text, holder_pid, jobs_dir, new_run_id, pid_alive,
                   progress_problem, read_record, state_problem)
from .standby import PREPARE_STAGE, prepared_run, standby_alive, standby_ready, stop_standby

LIVE_PHASES = ("starting", "training", "analyzing")
NOTHING_SAVED = "stopped before its run folder was written: nothing was started or saved; start it again"


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
    standby = S.claim(root)
    held = (standby or {}).get("rec", {}).get("prepared")
    use_prepared = not resume and held is not None and held.get("sha256") == cfg.sha256()
    run_id = held["run_id"] if use_prepared else (resume or new_run_id(cfg.name))
    cfg_path = jd / f"{run_id}.yaml"
    log_path = jd / f"{run_id}.log"
    try:
        atomic_write_text(cfg_path, cfg.to_yaml())  # also marks the run as launched: it is never discarded
    except BaseException:
        if standby is not None:  # give the standby back, untouched
            S.give_back(root, standby)
        raise
    if held is not None and not use_prepared and not held.get("done"):
        S.stop_preparing(root, held["run_id"])  # another configuration: the standby drops it and takes this job
    (jd / f"{run_id}.exit.json").unlink(missing_ok=True)  # a resumed job's old ending
    argv = ["--runs", str(root.resolve()), "--run-id", run_id, "--config", str(cfg_path.resolve())]
    if not analyze:
        argv.append("--no-analyze")
    if resume or use_prepared:
        argv.append("--resume")
    record = {"run_id": run_id, "started": _dt.datetime.now().isoformat(timespec="seconds"),
              "config": str(cfg_path), "log": str(log_path), "resume": bool(resume), "prepared": use_prepared}
    warm = S.hand_over(root, standby, argv, log_path) if standby is not None else None
    if warm is not None:
        atomic_write_json(jd / f"{run_id}.json", {**record, **warm})
        return run_id
    cmd = [sys.executable, "-m", S.WORKER, *argv]
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


def _end_children(grace: float = END_GRACE_S) -> None:
    """At this process's exit: stop every job or standby process it started that still runs, with
    its process group (a standby's warm-up): SIGHUP first (a job stops as a cancel stops it, saying
    why: ``worker.PARENT_GONE``) and SIGKILL after ``grace`` seconds."""
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


# ----------------------------------------------------------------------------------------------
# A warm standby process (the protocol: locphylax_core.standby)


def ensure_standby(runs_root: str | Path) -> bool:
    """Start a standby job process unless one is waiting already or a job is running (importing
    torch would take CPU from it). True when one is waiting or starting."""
    root = Path(runs_root)
    sd = S.standby_dir(root)
    if S.live_standby(root) is not None:
        return True
    if any(j.live for j in list_jobs(root)):
        return False
    sd.mkdir(parents=True, exist_ok=True)
    token = f"standby-{secrets.token_hex(6)}"
    with open(sd / "standby.log", "ab") as log:
        proc = _spawn([sys.executable, "-m", S.WORKER, "--runs", str(root.resolve()), "--standby", token], log, root)
    S.record_started(root, proc.pid, token)
    return True


def prepare(cfg: RunConfig, runs_root: str | Path, stop_after: str = PREPARE_STAGE) -> str | None:
    """Have the waiting standby run ``cfg`` up to the stage ``stop_after`` now, so that a later
    :func:`launch` of the same configuration starts from there. Returns the id of the run being
    prepared (or prepared already), or None: no ready standby, or a job is running (the work would
    take its CPU). Cheap and idempotent: the app calls it on every page run. Preparing another
    configuration stops and deletes the one prepared before."""
    root = Path(runs_root)
    rec = S.live_standby(root)
    if rec is None or not rec.get("ready") or any(j.live for j in list_jobs(root)):
        return None
    return S.request_prepare(root, rec, cfg, stop_after)


# ----------------------------------------------------------------------------------------------
# What a job is doing, and stopping it


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
    rec = read_record(jd / f"{run_id}.json")
    run_path = root / run_id
    if rec is None and not run_path.is_dir():
        return JobStatus(run_id, "missing", False, error=f"no job or run {run_id!r} under {root}")
    alive = bool(rec) and pid_alive(int(rec.get("pid", -1)), rec.get("token", run_id))
    state = read_record(RunDir(run_path).state_path) or {}
    state = {} if state_problem(state) else state  # a damaged run: its job's outcome alone is shown
    progress = read_record(RunDir(run_path).progress_path) or {}
    progress = {} if progress_problem(progress) else progress
    exit_rec = read_record(jd / f"{run_id}.exit.json")
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
    rec = read_record(jobs_dir(root) / f"{run_id}.json")
    run_path = root / run_id
    RunDir(run_path).ask_to_stop()
    token = (rec or {}).get("token", run_id)
    if rec is not None and pid_alive(int(rec["pid"]), token):
        pid = int(rec["pid"])
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pid_alive(pid, token):
            time.sleep(0.1)
        if pid_alive(pid, token):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and pid_alive(pid, token):
                time.sleep(0.05)
            write_exit(root, run_id, 137, "cancelled", "killed after the grace period")
        if not (jobs_dir(root) / f"{run_id}.exit.json").exists():
            # SIGTERM before the job process could catch it (it was still importing): it wrote nothing
            write_exit(root, run_id, 143, "cancelled", None if RunDir(run_path).is_run() else NOTHING_SAVED)
    return job_status(root, run_id)


def write_exit(root: Path, run_id: str, rc: int, phase: str, error: str | None = None) -> None:
    """The job's ending, as its record's ``<run_id>.exit.json`` (written by the job process as it
    ends, or by :func:`cancel` for a job it had to kill)."""
    atomic_write_json(jobs_dir(root) / f"{run_id}.exit.json",
                      {"rc": rc, "phase": phase, "error": error,
                       "ended": _dt.datetime.now().isoformat(timespec="seconds")})


__all__ = ["JOBS_DIR", "LIVE_PHASES", "NOTHING_SAVED", "PREPARE_STAGE", "JobStatus", "jobs_dir", "launch", "cancel",
           "job_status", "list_jobs", "ensure_standby", "standby_alive", "standby_ready", "stop_standby", "prepare",
           "prepared_run"]
