"""The warm standby protocol: a job process started ahead of time, waiting for the next job.

A fresh job process spends seconds importing torch and transformers before it trains anything.
:func:`locphylax_core.jobs.ensure_standby` starts one ahead of time (``python -m
locphylax_core.worker --standby TOKEN``, recorded by :func:`record_started`) while nothing else
runs. :func:`locphylax_core.jobs.launch` takes it (:func:`claim`) and hands it the next job
(:func:`hand_over`) when it is ready, so the job starts at once; otherwise it starts a fresh
process. The standby process itself runs :func:`serve`: it waits, and returns the job it was
handed, which it then becomes (:mod:`locphylax_core.worker`).

A job that is likely next (the Live demo's, for the trigger typed in its box) goes one step further
(:func:`locphylax_core.jobs.prepare`, :func:`request_prepare`): the waiting standby runs it up to a
stage (``victim``: the backdoor is planted) and keeps the run ``prepared``; a launch of the same
configuration (equal :meth:`RunConfig.sha256`) then resumes that run instead of starting from
nothing, with the same results (resume is bit-identical). A prepared run nobody launched is deleted
when another configuration is prepared or launched, and when the standby exits.

Files, in ``<runs>/.jobs/standby/``::

    state.json          the waiting standby: pid, token, ready, warm, prepared (renamed to
                        claimed-<hex>.json by the launcher that takes it, retired-<hex>.json to retire it)
    go.json             the job handed to it: the job process's arguments and its log file
    prepare.json        a run it should start ahead of time, up to one stage
    prepare-<id>.yaml   that run's configuration
    standby.log         the standby's own output until it becomes a job

This module is private to the core: the app and the CLI use :mod:`locphylax_core.jobs`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .config import RunConfig
from .runs import RunDir, atomic_write_json, atomic_write_text, holder_pid, jobs_dir, new_run_id, pid_alive, read_record

STANDBY_DIR = "standby"
STANDBY_IDLE_S = 3600.0  # a standby process nobody used within an hour exits
PREPARE_STAGE = "victim"  # what a prepared run runs ahead of the click: the backdoor is planted
WORKER = "locphylax_core.worker"  # the module a standby, its warm-up and every job process run
STATE, GO, PREPARE = "state.json", "go.json", "prepare.json"  # in standby_dir (the module's docstring)


def standby_dir(runs_root: str | Path) -> Path:
    return jobs_dir(runs_root) / STANDBY_DIR


def _state_file(runs_root: str | Path) -> Path:
    return standby_dir(runs_root) / STATE


def live_standby(runs_root: str | Path) -> dict | None:
    """The standby's record while its process runs (importing or ready), else None."""
    rec = read_record(_state_file(runs_root))
    return rec if rec and pid_alive(int(rec["pid"]), rec["token"]) else None


def standby_alive(runs_root: str | Path) -> bool:
    """A standby process runs (still importing, waiting, or preparing a run)."""
    return live_standby(runs_root) is not None


def standby_ready(runs_root: str | Path) -> bool:
    """A standby waits with everything a job needs imported and UMAP compiled (``warm``)."""
    rec = live_standby(runs_root)
    return bool(rec and rec.get("ready") and rec.get("warm"))


def record_started(runs_root: str | Path, pid: int, token: str) -> None:
    """Record the standby process just started (``pid``, its command line holding ``token``): not
    ready until it says so."""
    atomic_write_json(_state_file(runs_root), {"pid": pid, "token": token, "ready": False,
                                               "started": _dt.datetime.now().isoformat(timespec="seconds")})


def stop_standby(runs_root: str | Path) -> bool:
    """Retire the run store's idle standby (it and its warm-up exit within moments), e.g. when the
    app that started it stops. A standby that has taken a job is that job now and is left alone.
    True when one was retired."""
    sd = standby_dir(runs_root)
    if live_standby(runs_root) is None:
        return False
    retired = sd / f"retired-{secrets.token_hex(4)}.json"
    try:
        os.rename(sd / STATE, retired)  # atomic against a launcher claiming it at this moment
    except OSError:
        return False
    retired.unlink(missing_ok=True)
    return True


def request_prepare(runs_root: str | Path, rec: dict, cfg: RunConfig, stop_after: str = PREPARE_STAGE) -> str:
    """Ask the live standby ``rec`` (:func:`live_standby`, ready) to run ``cfg`` up to the stage
    ``stop_after`` now; the id of the run being prepared (or prepared already) for ``cfg``.
    Preparing another configuration stops and deletes the one prepared before."""
    root = Path(runs_root)
    sha, sd = cfg.sha256(), standby_dir(root)
    # the request first, then the state: the standby records a request in its state before it
    # removes the request file, so one of the two reads sees it
    asked = read_record(sd / PREPARE)
    if asked is not None and asked.get("token") == rec["token"] and asked.get("sha256") == sha:
        return asked["run_id"]
    held = (read_record(sd / STATE) or rec).get("prepared")
    if held is not None and held.get("sha256") == sha:
        return held["run_id"]
    if held is not None and not held.get("done"):
        stop_preparing(root, held["run_id"])
    run_id = new_run_id(cfg.name)
    cfg_path = sd / f"prepare-{run_id}.yaml"
    atomic_write_text(cfg_path, cfg.to_yaml())
    atomic_write_json(sd / PREPARE, {"token": rec["token"], "run_id": run_id, "config": str(cfg_path.resolve()),
                                            "sha256": sha, "stop_after": stop_after})
    return run_id


def prepared_run(runs_root: str | Path, cfg: RunConfig) -> tuple[str, bool] | None:
    """The run the standby prepares (or has prepared) for ``cfg``, and whether it is ready."""
    rec = live_standby(runs_root)
    held = (rec or {}).get("prepared")
    if held is None or held.get("sha256") != cfg.sha256():
        return None
    return held["run_id"], bool(held.get("done"))


def stop_preparing(root: Path, run_id: str, wait: float = 5.0) -> None:
    """Ask the standby's preparing run to stop at its next step (its folder may still be being set
    up: wait for it a few seconds)."""
    run = RunDir(root / run_id)
    deadline = time.monotonic() + wait
    while not run.is_run() and time.monotonic() < deadline:
        time.sleep(0.05)
    if run.is_run():
        run.ask_to_stop()


def discard_prepared(root: Path, run_id: str) -> None:
    """Delete a run the standby prepared and nobody launched (never one a job was launched for,
    nor one another process holds)."""
    (standby_dir(root) / f"prepare-{run_id}.yaml").unlink(missing_ok=True)
    path = root / run_id
    if (jobs_dir(root) / f"{run_id}.yaml").exists() or holder_pid(path) is not None:
        return
    if (read_record(RunDir(path).state_path) or {}).get("status") in ("prepared", "cancelled", "created", "running"):
        shutil.rmtree(path, ignore_errors=True)


def claim(root: Path) -> dict | None:
    """Take the live standby for one launch (``rec``: its record, ``claimed``: where its state file
    now is), or None."""
    sd = standby_dir(root)
    rec = live_standby(root)
    if rec is None:
        return None
    claimed = sd / f"claimed-{secrets.token_hex(4)}.json"
    try:
        os.rename(sd / STATE, claimed)  # atomic: one launcher gets it
    except OSError:
        return None
    return {"rec": read_record(claimed) or rec, "claimed": claimed}


def give_back(root: Path, standby: dict) -> None:
    """Return a claimed standby, untouched, for a later launch."""
    os.replace(standby["claimed"], _state_file(root))


def hand_over(root: Path, standby: dict, argv: list[str], log_path: Path, wait: float = 3.0) -> dict | None:
    """Give the job to the claimed standby process; its job-record fields, or None (a ready, idle
    one did not take the job in ``wait`` seconds: the caller starts a fresh process). A standby
    still importing, or busy preparing a run, takes the job as soon as it can, which is sooner than
    a fresh process would be."""
    rec, claimed = standby["rec"], standby["claimed"]
    go = standby_dir(root) / GO
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


# ----------------------------------------------------------------------------------------------
# The standby process's side


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


def serve(root: Path, token: str, prepare_run: Callable[[Path, dict], bool]) -> list[str] | None:
    """The standby process: import what every job needs, say so, wait for a job and return its
    arguments (the caller becomes that job, its output already sent to the job's log), or None when
    it is retired or nobody came within :data:`STANDBY_IDLE_S`. Meanwhile it runs the prepared run
    it is asked for with ``prepare_run(root, request)`` (False: stopped or failed, nothing kept)."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel  # noqa: F401  (most of a job's start)
    sd = standby_dir(root)
    state, go = sd / STATE, sd / GO
    # UMAP's compilation in a process of its own (a job can be taken meanwhile), into the cache
    # that this process and the job it becomes then read; paused while a run is prepared and
    # stopped when a job is taken, which need the CPUs first (a job that needs UMAP before the
    # warm-up ended compiles it itself, as a fresh process would)
    # (LOCPHYLAX_WARM_UP=0: skipped, e.g. by the tests, which share one cache)
    warm = os.environ.get("LOCPHYLAX_WARM_UP", "1") == "0"
    warming = None if warm else subprocess.Popen(  # in our process group: a cancel or our end stops it too
        [sys.executable, "-m", WORKER, "--runs", str(root), "--warm-up", "--parent", str(os.getpid())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    def update(**fields) -> None:  # our state file, unless a launcher has claimed it meanwhile
        rec = read_record(state)
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
            job = read_record(go)
            if job is not None and job.get("token") == token:
                go.unlink(missing_ok=True)
                if prepared is not None and prepared["run_id"] not in job["argv"]:
                    discard_prepared(root, prepared["run_id"])
                prepared = None  # the job's now, or gone
                log = open(job["log"], "ab")
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                if warming is not None and warming.poll() is None:
                    # the job needs the CPUs; one that needs UMAP compiles what is missing itself, and
                    # numba's cache only ever holds whole files (written aside, then renamed)
                    warming.kill()
                return list(job["argv"])
            asked = read_record(sd / PREPARE)
            if asked is not None and asked.get("token") == token:
                if prepared is not None:
                    discard_prepared(root, prepared["run_id"])
                prepared = {"run_id": asked["run_id"], "sha256": asked["sha256"], "done": False}
                update(prepared=prepared)  # not done: busy, so a launcher does not wait for an answer
                (sd / PREPARE).unlink(missing_ok=True)  # after the state says so (see request_prepare())
                with _paused(warming):
                    ok = prepare_run(root, asked)
                prepared = {**prepared, "done": True} if ok else None
                update(prepared=prepared)
                continue
            if not state.exists() and not any(sd.glob("claimed-*.json")):  # removed: nobody will hand us a job
                if warming is not None:
                    warming.terminate()
                return None
            time.sleep(0.05)
        state.unlink(missing_ok=True)
        return None
    finally:
        if warming is not None and warming.poll() is None:
            warming.terminate()
        if prepared is not None:  # prepared for a launch that never came
            discard_prepared(root, prepared["run_id"])
