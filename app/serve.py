"""Serve the app from a script: `streamlit run app/Home.py` on a free localhost port, for the
end-to-end test and the app benchmarks (the command line uses `make app`)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from locphylax_core import jobs

HOME = Path(__file__).resolve().parent / "Home.py"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                  "--no-first-run", "--disable-component-update", "--disable-sync"]  # no calls to a closed network
# the default page is served at the root URL; the others at their url_path
PAGE_URLS = {"live_demo": "", "setup": "setup", "run": "run", "aggregation": "aggregation", "heads": "heads",
             "compare": "compare", "casd": "casd", "layers": "layers", "export": "export"}
PAGE_TITLES = {"live_demo": "Backdoor collapse, live", "setup": "Setup", "run": "Run", "aggregation": "Aggregation",
               "heads": "Heads", "compare": "Compare", "casd": "CASD", "layers": "Layers", "export": "Export"}


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
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(HOME), "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
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
            os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
        jobs.stop_standby(runs_root)  # the warm job process the page started has no app to serve now
        if log:
            out.close()
