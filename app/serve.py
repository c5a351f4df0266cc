"""Serve the app: ``python app/serve.py`` is what `make app` runs (``--host``, default 127.0.0.1:
only this machine can reach it; ``make app HOST=0.0.0.0`` opens it to the network), and
:func:`streamlit_server` serves it the same way on a free localhost port for the end-to-end test
and the app benchmarks.

Every process the app starts ends with it: a job process is told the server's pid and ends when
the server is gone, and the server ends its job processes as it exits (``locphylax_core.jobs``).
A closed terminal (SIGHUP) stops the server as SIGTERM and Ctrl-C do, so that it exits cleanly."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOME = Path(__file__).resolve().parent / "Home.py"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                  "--no-first-run", "--disable-component-update", "--disable-sync"]  # no calls to a closed network
# the default page is served at the root URL; the others at their url_path
PAGE_URLS = {"live_demo": "", "setup": "setup", "run": "run", "aggregation": "aggregation", "heads": "heads",
             "compare": "compare", "casd": "casd", "layers": "layers", "export": "export"}
PAGE_TITLES = {"live_demo": "Backdoor collapse, live", "setup": "Setup", "run": "Run", "aggregation": "Aggregation",
               "heads": "Heads", "compare": "Compare", "casd": "CASD", "layers": "Layers", "export": "Export"}


DEFAULT_HOST = "127.0.0.1"  # this machine only: the Setup page can start any model folder's run
DEFAULT_PORT = 8501


def streamlit_args(port: int, host: str = DEFAULT_HOST) -> list[str]:
    """``streamlit run``'s arguments for the app on ``host``:``port``."""
    return [str(HOME), "--server.port", str(port), "--server.address", host, "--server.headless", "true",
            "--browser.gatherUsageStats", "false"]


def main(argv: list[str] | None = None) -> int:
    """`make app`: the app on ``--host`` (default 127.0.0.1) and ``--port``; further ``--server.*``
    options go to streamlit as they are."""
    ap = argparse.ArgumentParser(prog="python app/serve.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=DEFAULT_HOST,
                    help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    args, rest = ap.parse_known_args(argv)
    # streamlit stops cleanly on SIGTERM, SIGINT and SIGQUIT, and then this process's exit ends the
    # job processes it started; a hang-up (a closed terminal) would kill it outright without that
    signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))
    from streamlit.web import cli as stcli
    sys.argv = ["streamlit", "run", *streamlit_args(args.port, args.host), *rest]
    return stcli.main()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(runs_root: str | Path, log: str | Path | None = None, timeout: float = 60.0):
    """Yield the URL of a headless app server that reads runs from ``runs_root``; stop it on exit."""
    port = free_port()
    env = {**os.environ, "LOCPHYLAX_RUNS": str(runs_root), "TOKENIZERS_PARALLELISM": "false"}
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--port", str(port),
                             "--server.fileWatcherType", "none"],  # as `make app` serves it, on localhost
                            cwd=HOME.parent.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"streamlit did not start (exit code {proc.poll()}); see {log}") from None
                time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)  # the server ends the job processes it started as it exits
        from locphylax_core import jobs
        jobs.stop_standby(runs_root)  # (and so would a standby it left behind, once it sees its server gone)
        if log:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
