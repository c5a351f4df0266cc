"""The job process: ``python -m locphylax_core.worker``, started by :mod:`locphylax_core.jobs`.

It runs (or resumes) one run's pipeline, then its analyses, writing its progress to the run folder
(``progress.json``) as it goes and its ending to the job's record (``<runs>/.jobs/<run_id>.exit.json``).
A cancel (the run's CANCEL file, SIGTERM) stops it after the current step with a resumable run, and
so does the end of the process that started it (``--parent``: SIGHUP).

``--standby TOKEN`` makes it the warm standby instead (:mod:`locphylax_core.standby`): it imports
what every job needs, prepares the run it is asked to, and becomes the job it is handed.
``--warm-up`` compiles the analyses' numba kernels and exits (the standby's warm-up).

This module is private to the core: the app and the CLI use :mod:`locphylax_core.jobs`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import standby
from .analysis.representations import warm_up
from .analysis.run_analysis import analyze_run
from .cli import quiet_libraries
from .config import load_config
from .errors import Cancelled, LocphylaxError
from .jobs import END_GRACE_S, NOTHING_SAVED, write_exit
from .pipeline import resume_run, start_run
from .runs import RunDir

PARENT_GONE = "stopped: the app (or process) that started this job ended; resume it to go on"


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
    standby.discard_prepared(root, run_id)
    return False


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
    ap = argparse.ArgumentParser(prog="python -m locphylax_core.worker")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--standby", metavar="TOKEN", help="wait, warm, for a job handed over by jobs.launch()")
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
            job = standby.serve(Path(args.runs), args.standby, prepare_run=_prepare_run)
            return 0 if job is None else main(job)  # the standby becomes the job it was handed
        except KeyboardInterrupt:  # stopped while still importing, or waiting (SIGHUP: the app that started us ended)
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
        write_exit(root, args.run_id, rc, phase, error)
    return rc


if __name__ == "__main__":
    sys.exit(main())
