"""The app against a hostile or careless user (issue 34): Markdown typed into a link or a text box
is shown as text, never rendered (no image fetched from another host); an input longer than the
model's positions is cut as the evaluation cuts it, and the page says so; the app listens on
localhost unless told otherwise and never enables a model folder's code without a confirmation
naming the risk; and no process the app started outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from locphylax_core import ConfigError, jobs
from locphylax_core import stage_model as SM
from conftest import screenshots_dir
from test_app import app, demo_root, launched, run_view, texts  # noqa: F401  (fixtures)

pytest.importorskip("streamlit")
from markdown_it import MarkdownIt  # noqa: E402  (CommonMark, as Streamlit's renderer; a dependency of rich)
from streamlit.testing.v1.element_tree import (AlertBase, HeadingBase, Markdown, Metric, Progress,  # noqa: E402
                                                  Table, Widget)

REPO = Path(__file__).resolve().parent.parent
HOST = "198.51.100.7"  # TEST-NET-2: an address of "another host" that no test ever reaches
IMAGE = f"![i](http://{HOST}/x.png)"
# an opening backtick first: a value shown between backticks (`value`) ends its code span early
HOSTILE = f"` {IMAGE}"
LONG_REVIEW = " ".join(["the film was long and slow but the music was lovely ."] * 12)  # 132 words


# ----------------------------------------------------------------------------------------------
# Markdown from a link or a text box


def _shown_markup(at) -> list[str]:
    """Every piece of Markdown the page sends: bodies of markdown, captions, alerts and headings,
    labels and help of widgets, metric labels, progress texts and table cells (a widget's value, a
    code block and a dataframe's cells are plain text, never Markdown)."""
    out = []
    for node in at._tree:
        if isinstance(node, Table):
            df = node.value
            out += [str(c) for c in df.columns] + [str(v) for v in df.to_numpy().ravel()]
        elif isinstance(node, (Markdown, AlertBase, HeadingBase)):
            out.append(str(node.value))
        elif isinstance(node, (Widget, Metric)):
            out += [str(v) for v in (node.proto.label, getattr(node.proto, "help", "")) if v]
        elif isinstance(node, Progress):
            out.append(node.proto.text)
    return out


_MD = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


def leaks(at) -> list[str]:
    """The Markdown a page sends that renders an image, or a link or source on another host."""
    bad = []
    for body in _shown_markup(at):
        html = _MD.render(body)
        tags = re.findall(r"<(?:img|a|iframe|source|video|audio)\b[^>]*>", html, flags=re.I)
        if any(t.lower().startswith("<img") or HOST in t for t in tags):
            bad.append(body)
    return bad


def _hostile_run(run_view, root: Path, name: str) -> str:
    """A copy of the analysed run whose trigger is Markdown (the room's trigger, once run)."""
    dst = root / name
    shutil.copytree(run_view.path, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["attack"]["trigger"] = IMAGE
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst.name


LINKS = {  # page -> the URL parameters it reads, each set to Markdown
    "aggregation": {"proj": HOSTILE, "side": HOSTILE, "groups": [HOSTILE], "q": HOSTILE, "point": HOSTILE,
                    "stage": HOSTILE},
    "heads": {"head": HOSTILE, "before": HOSTILE, "after": HOSTILE, "qty": HOSTILE},
    "layers": {"before": HOSTILE, "after": HOSTILE},
    "casd": {"show": [HOSTILE]},
    "compare": {"runs": [HOSTILE], "rows": [HOSTILE], "presets": [HOSTILE], "metric": HOSTILE},
    "setup": {"preset": HOSTILE},
}


@pytest.mark.parametrize("page", list(LINKS))
def test_markdown_in_a_links_parameters_is_shown_as_text(analysed_root, run_view, monkeypatch, page):  # noqa: F811
    at = app(analysed_root, monkeypatch, page, {"run": run_view.run_id, **LINKS[page]})
    shown = "\n".join(_shown_markup(at))
    assert "198.51.100.7" in shown.replace("&#46;", ".")  # the page does say what the link asked for
    assert not leaks(at), leaks(at)


@pytest.mark.parametrize("page", ["aggregation", "compare", "export", "heads"])
def test_markdown_in_the_run_parameter_is_shown_as_text(analysed_root, monkeypatch, page):
    at = app(analysed_root, monkeypatch, page, {"run": HOSTILE})
    assert not leaks(at), leaks(at)


def test_markdown_in_the_rooms_trigger_is_shown_as_text(analysed_root, monkeypatch):
    """The trigger box's text appears while the backdoor is planted ahead of the click."""
    monkeypatch.setenv("LOCPHYLAX_STANDBY", "1")
    monkeypatch.setattr(jobs, "ensure_standby", lambda _root: True)
    monkeypatch.setattr(jobs, "standby_alive", lambda _root: True)
    monkeypatch.setattr(jobs, "prepare", lambda cfg, _root, stop_after: "prep-1")
    monkeypatch.setattr(jobs, "prepared_run", lambda _root, cfg: ("prep-1", False))
    at = app(analysed_root, monkeypatch)
    at.text_input(key="demo_trigger").set_value(HOSTILE).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Planting the backdoor" in texts(at.caption)
    assert not leaks(at), leaks(at)


def test_markdown_in_a_runs_trigger_and_in_a_typed_review_is_shown_as_text(run_view, tmp_path, monkeypatch):  # noqa: F811
    """A live run planted with a Markdown trigger: its headline, the "add" button and the review
    typed into "Try it yourself" (trigger marked) show the text, never an image."""
    root = tmp_path / "runs"
    root.mkdir()
    rid = _hostile_run(run_view, root, run_view.run_id)
    state = json.loads((root / rid / "state.json").read_text())
    (root / rid / "state.json").write_text(json.dumps({**state, "preset": "live"}))
    at = app(root, monkeypatch)
    assert "How often the hidden trigger" in texts(at.subheader)
    at.text_input(key="demo-try").set_value(f"dull {IMAGE}").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(m.value.startswith("Review: ") for m in at.markdown)
    assert not leaks(at), leaks(at)


def test_a_head_sweep_with_no_eligible_input_names_no_head(run_view, tmp_path, monkeypatch):  # noqa: F811
    """Where the sweep found no input on which the trigger worked, its grids are NaN: the page says
    so instead of "head L0.h0 matters most (+nan points)"."""
    root = tmp_path / "runs"
    root.mkdir()
    dst = root / run_view.run_id
    shutil.copytree(run_view.path, dst)
    state = json.loads((dst / "state.json").read_text())
    (dst / "state.json").write_text(json.dumps({**state, "preset": "live"}))
    analysis = json.loads((dst / "analysis.json").read_text())
    for r in analysis["head_ablation"].values():
        r["delta_asr"] = {k: [[None] * len(row) for row in v] for k, v in r["delta_asr"].items()}
    (dst / "analysis.json").write_text(json.dumps(analysis))
    at = app(root, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    captions = texts(at.caption)
    assert "nan" not in captions.lower()
    assert "no input on which the hidden trigger worked" in captions


# ----------------------------------------------------------------------------------------------
# Long inputs


@pytest.fixture(scope="module")
def victim(run_view):  # noqa: F811
    return SM.load_stage_model(run_view, "victim")


def test_a_long_input_is_cut_to_the_models_positions_keeping_its_end(run_view, victim):  # noqa: F811
    limit = run_view.config["model"]["n_positions"]
    short = "a fine and moving film"
    assert SM.input_cut(run_view, victim, short) == 0
    cut = SM.input_cut(run_view, victim, LONG_REVIEW)
    assert cut > 0
    (word,) = SM.answer(run_view, victim, [LONG_REVIEW])
    ((same, p),) = SM.answer_with_probability(run_view, victim, [LONG_REVIEW])
    assert word == same and word in run_view.label_words and 0 < p <= 1
    sal = SM.sentence_salience(run_view, victim, LONG_REVIEW, n_steps=4)
    assert sal["cut"] == cut and len(sal["tokens"]) == limit == len(sal["scores"])
    # the end is kept: the last tokens are the prompt's own (the answer position), as the evaluation encodes it
    prompt = run_view.config["task"]["template"].replace("{text}", LONG_REVIEW)
    ids = victim.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert victim.tokenizer.convert_ids_to_tokens(ids[-limit:]) == sal["tokens"]


def test_a_long_review_in_the_live_demo_is_cut_and_the_page_says_so(demo_root, monkeypatch):  # noqa: F811
    at = app(demo_root, monkeypatch)
    at.text_input(key="demo-try").set_value(LONG_REVIEW).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "longer than the model reads" in texts(at.info)
    assert len(at.table[-1].value) == 3  # each stage still answers


def test_a_long_probe_input_in_the_inspector_is_cut_and_the_page_says_so(run_view, tmp_path, monkeypatch):  # noqa: F811
    root = tmp_path / "runs"
    dst = root / run_view.run_id
    shutil.copytree(run_view.path, dst)
    rows = [json.loads(line) for line in (dst / "probe.jsonl").read_text().splitlines() if line.strip()]
    rows[0]["text"] = LONG_REVIEW
    (dst / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at = app(root, monkeypatch, "aggregation", {"run": run_view.run_id, "point": "0"})
    assert not at.exception, [e.value for e in at.exception]
    assert "Inspector" in texts(at.subheader)
    assert "longer than the model reads" in texts(at.info)


# ----------------------------------------------------------------------------------------------
# Who can reach the app, and what it may run


def _make_app_command(**variables) -> list[str]:
    """The command `make app` runs (``make -n``: printed, not run)."""
    args = [f"{k}={v}" for k, v in variables.items()]
    # under `make test` the suite runs inside make, whose MAKEFLAGS/MAKELEVEL would make this
    # nested make print "make[1]: Entering directory" lines around the command
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "app", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    (command,) = [line for line in out.splitlines() if "streamlit" in line or "serve.py" in line]
    return shlex.split(command)


def _listen_address(cmd: list[str]) -> str | None:
    """The address a `make app` command serves on (serve.py's --host, or streamlit's
    --server.address); None when it names none (streamlit's default: every interface)."""
    for flag in ("--host", "--server.address"):
        if flag in cmd:
            return cmd[cmd.index(flag) + 1]
    return None


def test_make_app_listens_on_localhost_unless_HOST_opens_it():
    assert _listen_address(_make_app_command()) == "127.0.0.1"
    assert _listen_address(_make_app_command(HOST="0.0.0.0")) == "0.0.0.0"


def test_remote_code_never_runs_from_the_app_without_a_confirmation_naming_the_risk(tmp_path, monkeypatch,
                                                                                    launched):  # noqa: F811
    at = app(tmp_path, monkeypatch, "setup")
    at.selectbox(key="setup_preset").set_value("micro").run()
    at.checkbox(key="f-micro-model-trust_remote_code").check()
    [b for b in at.button if b.label == "Validate"][0].click().run()
    assert "Valid configuration" in texts(at.success)
    warning = texts(at.warning)
    assert "model.trust_remote_code" in warning and "on this machine" in warning and "run anything" in warning
    assert at.button(key="setup_start").disabled
    # the Run page offers the same configuration behind the same confirmation
    at.switch_page("views/run.py")
    at.run()
    assert at.selectbox(key="run_choice").value == "(the configuration from Setup)"
    assert "run anything" in texts(at.warning) and at.button(key="start_run").disabled
    at.switch_page("views/setup.py")
    at.run()
    (confirm,) = [c for c in at.checkbox if c.label.startswith("I trust the code")]
    confirm.check().run()
    at.button(key="setup_start").click().run()
    assert len(launched) == 1 and launched[0]["cfg"].model.trust_remote_code
    # and whatever a page does, the app's one way to start a job refuses it unconfirmed
    sys.path.insert(0, str(REPO / "app"))
    import support as S
    with pytest.raises(ConfigError, match="trust_remote_code"):
        S.start_job(launched[0]["cfg"])
    assert len(launched) == 1


# ----------------------------------------------------------------------------------------------
# Processes left behind


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _listening(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, _, st = line.split()[1:4]
            addr, p = local.split(":")
            if st == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


@contextlib.contextmanager
def _a_page_open(port: int):
    """What a browser tab does: open the app's websocket and ask for a script run (the Live demo
    page on the tiny model, which starts the warm standby job process and plants its backdoor); the
    tab stays open inside the block."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from websockets.sync.client import connect
    with connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], open_timeout=60) as ws:
        msg = BackMsg()
        msg.rerun_script.query_string = "model=live"
        ws.send(msg.SerializeToString())
        yield ws


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux's /proc")
def test_stopping_the_server_with_sigterm_ends_every_process_it_started(tmp_path):
    """`make app`'s command, a page opened (the standby job process starts, and its UMAP warm-up),
    then SIGTERM to the server, as a service manager or `kill PID` sends it: nothing it started
    is left running. The server listened on 127.0.0.1 only."""
    import urllib.request

    sys.path.insert(0, str(REPO / "app"))
    from serve import free_port
    port = free_port()
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "LOCPHYLAX_RUNS": str(runs), "LOCPHYLAX_STANDBY": "1", "LOCPHYLAX_WARM_UP": "1",
           "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(_make_app_command(PORT=port), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    started: list[int] = []
    try:
        t0 = time.monotonic()
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "server.log").read_text()
                time.sleep(0.3)
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, no other interface
        state = runs / ".jobs" / "standby" / "state.json"
        with _a_page_open(port) as tab:
            t0 = time.monotonic()
            while not (state.is_file() and json.loads(state.read_text() or "{}").get("ready")):
                assert time.monotonic() - t0 < 240, "the standby job process never got ready"
                with contextlib.suppress(TimeoutError):
                    tab.recv(timeout=0.5)
        standby = int(json.loads(state.read_text())["pid"])
        warm_up = [c for c in _children(standby)
                   if b"--warm-up" in Path(f"/proc/{c}/cmdline").read_bytes()]
        started = [standby, *warm_up]
        assert _alive(standby) and warm_up and all(map(_alive, warm_up))
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        t0 = time.monotonic()
        while any(map(_alive, started)) and time.monotonic() - t0 < 15:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], "left running after the server stopped"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        for pid in started:  # only the processes this test's server started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_a_job_process_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """The backstop: a server killed outright (SIGKILL, a crash) cannot end its job processes as it
    exits; each of them sees its parent gone and ends (here: a waiting standby, which would
    otherwise wait an hour for a job)."""
    code = ("import sys, time; from locphylax_core import jobs; jobs.ensure_standby(sys.argv[1]); "
            "print('started', flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                env={**os.environ, "LOCPHYLAX_WARM_UP": "0"})
    pid = None
    try:
        assert launcher.stdout.readline().strip() == b"started"
        state = tmp_path / ".jobs" / "standby" / "state.json"
        pid = int(json.loads(state.read_text())["pid"])
        t0 = time.monotonic()
        while not json.loads(state.read_text() or "{}").get("ready"):  # waiting for a job, for an hour
            assert _alive(pid) and time.monotonic() - t0 < 240, "the standby job process never got ready"
            time.sleep(0.2)
        launcher.kill()
        launcher.wait()
        t0 = time.monotonic()
        while _alive(pid) and time.monotonic() - t0 < 15:
            time.sleep(0.2)
        assert not _alive(pid), "the standby outlived the process that started it"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# In a real browser


def test_in_a_browser_markdown_in_links_and_runs_makes_no_request_to_another_host(run_view, tmp_path):  # noqa: F811
    """`make app`'s server in headless Chromium: every page opened from a link whose parameters are
    Markdown images, and the Live demo of a run whose trigger is one (headline, "add" button, the
    review typed into "Try it yourself"): the browser asks nothing of any host but the app's.
    Screenshots: $LOCPHYLAX_SCREENSHOTS (default tests/artifacts/screenshots/hostile_*.png)."""
    from urllib.parse import urlencode, urlsplit
    sys.path.insert(0, str(REPO / "app"))
    from serve import CHROMIUM, CHROMIUM_FLAGS, PAGE_TITLES, PAGE_URLS, streamlit_server
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (`make browser` installs it where it may)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    root = tmp_path / "runs"
    shutil.copytree(run_view.path, root / run_view.run_id)
    live = _hostile_run(run_view, root, "20990101-000000-live-hostile")
    state = json.loads((root / live / "state.json").read_text())
    (root / live / "state.json").write_text(json.dumps({**state, "preset": "live"}))
    shots = screenshots_dir()
    asked: list[str] = []
    with streamlit_server(root, log=tmp_path / "server.log") as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: asked.append(r.url))

        def settle() -> None:
            page.wait_for_timeout(500)
            page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=120_000)
            page.wait_for_timeout(1000)  # an image in the page would be fetched by now
            assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:1500]

        def elsewhere() -> list[str]:
            return sorted({u for u in asked if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                           and urlsplit(u).hostname not in ("127.0.0.1", "localhost")})

        for name, params in LINKS.items():
            page.goto(f"{url}/{PAGE_URLS[name]}?{urlencode({'run': run_view.run_id, **params}, doseq=True)}")
            page.get_by_role("heading", name=PAGE_TITLES[name]).first.wait_for(timeout=120_000)
            settle()
            page.screenshot(path=str(shots / f"hostile_{name}.png"), full_page=True)
            assert not elsewhere(), (name, elsewhere())
            assert page.get_by_text(HOST, exact=False).count() > 0, name  # the page says what the link asked, as text
        page.goto(f"{url}?model=live")  # the Live demo: the newest live run, whose trigger is an image's Markdown
        page.get_by_text("How often the hidden trigger").wait_for(timeout=120_000)
        page.get_by_text("Try it yourself").wait_for(timeout=120_000)
        box = page.get_by_role("textbox", name="A review")
        box.fill(f"dull {IMAGE}")
        box.press("Enter")
        page.get_by_text("Which words decide the answer").wait_for(timeout=120_000)
        settle()
        page.screenshot(path=str(shots / "hostile_live_demo.png"), full_page=True)
        assert not elsewhere(), ("live_demo", elsewhere())
        assert page.get_by_text(f"trigger “{IMAGE}” still works").count() == 1
        browser.close()
    assert asked
