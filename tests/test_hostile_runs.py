"""Hostile run stores (issue 34): values of a run printed as markup or escape sequences by the CLI,
run files that are not files (a FIFO, /dev/zero, deep nesting, a link out of the folder), an
Export page that served any file, and valid JSON of the wrong shape.

The checks that would hang or exhaust memory on a reader that trusts its files (a FIFO, a link to
/dev/zero) run in a child process with a time limit and an address-space limit, so a regression
fails the test instead of stopping the machine."""

from __future__ import annotations

import html
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, cli_in_process
from locphylax_core import load_config
from locphylax_core import runview as R
from locphylax_core.analysis import figures as F
from locphylax_core import runs as RS
from locphylax_core.runs import list_runs

ESC = "\x1b"
DEEP = "[" * 200_000  # 200 KB of nested brackets: RecursionError in json.loads



def _summary(run_id: str, preset: str = "micro", baselines: dict | None = None, trigger: str = "t1") -> dict:
    block = {"cacc": 0.9, "asr": {"unknown": 1.0, trigger: 0.5}, "asr_raw": {}}
    return {"schema": 1, "run_id": run_id, "preset": preset, "status": "done",
            "stages": {"victim": block, "stage1": block, "stage2": block}, "baselines": baselines or {},
            "seconds": {"victim": 1.0, "total": 3.0}, "triggers": {"unknown": "cf", trigger: "mn"}}


def _run(root: Path, name: str, state: dict | str | None = None, summary: dict | None = None,
         config: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if state is not None:
        (d / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (d / "config.yaml").write_text(config)
    return d


def _isolated(code: str, root: Path, timeout: float = 180) -> dict:
    """Run ``code`` in a child process limited to 3 GiB of address space and ``timeout`` seconds;
    it prints one line ``RESULT <json>``, returned parsed."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    env = {**cli_env(), "LOCPHYLAX_RUNS": str(root), "LOCPHYLAX_STANDBY": "0", "LOCPHYLAX_WARM_UP": "0"}
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still reading after {timeout} s: a run file that is not a file was read (a FIFO?)")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, (res.stdout[-3000:], res.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------
# 1. Terminal and markup injection in the CLI


def test_runs_prints_state_values_and_folder_names_as_plain_text(tmp_path, capsys, monkeypatch):
    """`"preset": "[/bold]"` made `locphylax runs` fail and list nothing; `[link=...]` became a
    link; escape sequences in folder names or state reached the terminal raw."""
    root = tmp_path / "runs"
    _run(root, "a-bold", {"status": "done", "preset": "[/bold]", "finished": []})
    _run(root, "b-link", {"status": "done", "preset": "[link=http://evil.example/]click[/link]", "finished": []})
    _run(root, f"c-{ESC}[2Jfolder", {"status": f"{ESC}]0;pwned\x07done", "preset": "p\x9b31m", "finished": []})
    monkeypatch.setenv("COLUMNS", "250")  # no wrapped cells
    rc, out = cli_in_process(capsys, "--runs", str(root), "runs")
    assert rc == 0, out
    assert "[/bold]" in out and "[link=http://evil.example/]click[/link]" in out  # as written, not as markup
    assert ESC not in out and "\x07" not in out and "\x9b" not in out
    assert "c-\\x1b[2Jfolder" in out and "\\x1b]0;pwned\\x07done" in out  # made visible
    monkeypatch.setenv("FORCE_COLOR", "1")  # as on a terminal: rich's own styles, but no link, no title
    rc, out = cli_in_process(capsys, "--runs", str(root), "runs")
    assert rc == 0 and "\x1b]8;" not in out and "\x1b]0;" not in out and "\x1b[2J" not in out, out


def test_show_prints_summary_names_as_plain_text(tmp_path, capsys, monkeypatch):
    """`show` failed on a run_id or a baseline name that reads as markup."""
    root = tmp_path / "runs"
    summary = _summary("[/bold]", preset="[link=http://evil.example/]x[/link]",
                       baselines={"[/red]": {"cacc": 0.5, "asr": {"unknown": 0.1}}}, trigger=f"{ESC}[2J")
    _run(root, "r1", {"status": "done", "finished": []}, summary)
    monkeypatch.setenv("COLUMNS", "250")
    rc, out = cli_in_process(capsys, "--runs", str(root), "show", "r1")
    assert rc == 0, out
    assert "run [/bold] ([link=http://evil.example/]x[/link], done)" in out
    assert "baseline: [/red]" in out and "ASR \\x1b[2J" in out and ESC not in out
    rc, out = cli_in_process(capsys, "--runs", str(root), "show", "r1", "--json")
    assert rc == 0 and ESC not in out and json.loads(out)["run_id"] == "[/bold]"


def test_error_messages_show_control_characters_visibly(tmp_path, capsys):
    root = tmp_path / "runs"
    _run(root, f"r-{ESC}]0;x", {"status": "done", "finished": []})
    rc, out = cli_in_process(capsys, "--runs", str(root), "show", f"r-{ESC}]0;x")
    assert rc == 2 and "summary.json: missing" in out and ESC not in out and "r-\\x1b]0;x" in out


# ----------------------------------------------------------------------------------------------
# 2. Run files that are not files


STORE_CHECKS = """
import json
from pathlib import Path
from locphylax_core import cli, RunDir
from locphylax_core import runview as R
from locphylax_core.runs import list_runs
root = Path({root!r})
out = {{"listed": {{i["run_id"]: [i["status"], i["problem"]] for i in list_runs(root)}},
        "views": {{p.name: [R.open_run(p).health, list(R.open_run(p).problems)] for p in root.iterdir()}}}}
for name in ("fifo", "zero", "deep", "outside"):
    try:
        RunDir(root / name).read_state()
        out[name] = "read"
    except Exception as e:
        out[name] = type(e).__name__ + ": " + str(e)
out["runs"] = cli.main(["--runs", str(root), "runs"])
out["show"] = cli.main(["--runs", str(root), "show", "deep-summary"])
out["resume"] = cli.main(["--runs", str(root), "resume", "deep", "--no-analyze"])
print("RESULT " + json.dumps(out))
"""


def test_run_files_that_are_not_files_are_refused_not_read(tmp_path):
    """A FIFO state.json hung `runs`; a link to /dev/zero exhausted memory; 200 KB of brackets raised
    RecursionError in `runs`, `show`, `resume` and runview.open_run."""
    root = tmp_path / "runs"
    config = load_config("micro").to_yaml()
    for name in ("fifo", "zero", "deep", "outside", "deep-summary", "good"):
        _run(root, name, config=config)
    os.mkfifo(root / "fifo" / "state.json")
    os.symlink("/dev/zero", root / "zero" / "state.json")
    os.symlink("/dev/zero", root / "zero" / "summary.json")
    (root / "deep" / "state.json").write_text(DEEP)
    (tmp_path / "elsewhere.json").write_text(json.dumps({"status": "done", "finished": []}))
    os.symlink(tmp_path / "elsewhere.json", root / "outside" / "state.json")
    for name in ("deep-summary", "good"):
        (root / name / "state.json").write_text(json.dumps({"status": "done", "finished": []}))
    (root / "deep-summary" / "summary.json").write_text('{"schema": 1, "stages": ' + DEEP)
    (root / "good" / "summary.json").write_text(json.dumps(_summary("good")))

    out = _isolated(STORE_CHECKS.format(root=str(root)), root)
    listed = out["listed"]
    assert listed["good"] == ["done", None]
    assert listed["fifo"] == ["corrupt (state.json unreadable)", "state.json: refused: a named pipe (FIFO), not a "
                                                                 "regular file"]
    assert listed["zero"][1] == listed["outside"][1] == "state.json: refused: a link to a file outside the run folder"
    assert listed["deep"] == ["corrupt (state.json unreadable)", "state.json: corrupt (nested more than 64 deep)"]
    views = out["views"]
    for name in ("fifo", "zero", "deep", "outside", "deep-summary"):
        assert views[name][0] == "corrupt", views[name]
    assert "state.json is corrupt (refused: a named pipe (FIFO), not a regular file)" in views["fifo"][1]
    assert "summary.json is corrupt (refused: a link to a file outside the run folder)" in views["zero"][1]
    assert "summary.json is corrupt (nested more than 64 deep)" in views["deep-summary"][1]
    assert views["good"][0] == "done"
    assert out["fifo"].startswith("RunFileError") and "named pipe" in out["fifo"]
    assert out["deep"].startswith("RunFileError") and "nested more than 64 deep" in out["deep"]
    assert out["runs"] == 0 and out["show"] == 2 and out["resume"] == 2


def test_a_link_inside_the_run_folder_is_read_and_sizes_are_bounded(tmp_path):
    run = _run(tmp_path, "r", {"status": "done", "finished": []})
    (run / "alias.json").symlink_to(run / "state.json")
    assert RS.read_json(run / "alias.json")["status"] == "done"
    (run / "big.json").write_text("[" + "0," * 100 + "0]")
    with pytest.raises(RS.RunFileError, match="larger than a run file may be"):
        RS.read_json(run / "big.json", limit=100)
    (run / "deepish.json").write_text("[" * 65 + "]" * 65)  # under the recursion limit, over the depth bound
    with pytest.raises(RS.RunFileError, match="nested more than 64 deep"):
        RS.read_json(run / "deepish.json")


# ----------------------------------------------------------------------------------------------
# 3. Export serves any file


def test_a_config_linked_outside_the_run_is_never_served(tmp_path, monkeypatch):
    """With config.yaml linked to /etc/passwd the run was marked corrupt, but Export's config
    download served /etc/passwd."""
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: secret\npassword: hunter2\n")  # a mapping: it would even read as a config
    run = _run(tmp_path / "runs", "20990101-000000-linked", {"status": "done", "finished": []})
    (run / "config.yaml").symlink_to(secret)
    view = R.open_run(run)
    assert view.health == "corrupt" and view.config_yaml == "" and not view.config
    assert "config.yaml is corrupt (refused: a link to a file outside the run folder)" in view.problems
    with pytest.raises(RS.RunFileError, match="outside the run folder"):
        R.run_file(view, "config.yaml")

    from test_app import app, texts
    at = app(tmp_path / "runs", monkeypatch, "export", {"run": run.name})
    assert "config.yaml" not in {b.proto.label for b in at.get("download_button")}
    assert "refused: a link to a file outside the run folder" in html.unescape(texts(at.error))
    (run / "config.yaml").unlink()
    (run / "config.yaml").write_text(secret.read_text())  # the run's own file: offered
    at = app(tmp_path / "runs", monkeypatch, "export", {"run": run.name})
    assert "config.yaml" in {b.proto.label for b in at.get("download_button")}


# ----------------------------------------------------------------------------------------------
# 4. Valid JSON of the wrong shape


def test_valid_json_of_the_wrong_shape_is_damaged_not_a_crash(tmp_path):
    """Integer lines in probe.jsonl, a projection that is a string, a metrics row whose method is a
    list (the curves download failed silently)."""
    run = _run(tmp_path, "r", {"status": "done", "finished": ["victim"]}, _summary("r"),
               config=load_config("micro").to_yaml())
    (run / "probe.jsonl").write_text("1\n2\n")
    (run / "analysis.json").write_text(json.dumps({
        "complete": True, "projections": {"pca": "analysis/projection_pca.safetensors"},
        "head_ablation": {"victim": {"delta_cacc": [[0.1, None]], "delta_asr": {"unknown": [[0.2]]}}},
        "aggregation": {"victim": {"aggregation_score": "high"}}}))
    row = {"key": "victim", "stage": "victim", "step": 1, "split": "curve", "cacc": 0.9, "asr": {"unknown": 1.0}}
    (run / "metrics.jsonl").write_text(json.dumps({**row, "method": ["locphylax"]}) + "\n"
                                       + json.dumps({**row, "method": "locphylax"}) + "\n" + '{"key": "vic')
    view = R.open_run(run)
    assert view.health == "corrupt"
    problems = "\n".join(view.problems)
    assert "probe.jsonl is corrupt (line 1: not a mapping)" in problems
    assert "analysis.json is damaged (projections: pca: not a mapping; left out)" in problems
    assert "analysis.json is damaged (head_ablation: victim: its grids differ in shape; left out)" in problems
    assert "analysis.json is damaged (aggregation: victim: aggregation_score is not a number; left out)" in problems
    assert "metrics.jsonl is damaged (1 row of the wrong shape left out; line 1: method is missing or not a string)" \
        in problems
    assert view.probe == () and view.analysis["projections"] == {} and view.analysis["head_ablation"] == {}
    assert len(view.metrics) == 1 and view.methods == ["locphylax"]  # the cut last line is skipped silently
    F.curves_figure(R.curve_rows(view), view.methods)  # the curves download
    with pytest.raises(KeyError):
        R.projection(view, "pca")
    assert R.aggregation_table(view).empty


def test_state_and_config_of_the_wrong_shape_are_damaged(tmp_path):
    run = _run(tmp_path, "r", {"status": ["done"], "finished": [1, 2], "preset": {"x": 1}},
               config="name: micro\ntask: {labels: negative}\ndefense: 3\n")
    view = R.open_run(run)
    assert view.health == "corrupt" and view.state == {} and view.config == {}
    assert any(p.startswith("state.json has the wrong shape (finished") for p in view.problems), view.problems
    assert any(p.startswith("config.yaml has the wrong shape (") for p in view.problems), view.problems
    assert view.label_words == [] and view.finished == []
    (info,) = list_runs(tmp_path)
    assert info["status"] == "corrupt (state.json has the wrong shape)"


# ----------------------------------------------------------------------------------------------
# Every page on a damaged run store


PAGES = ["live_demo", "setup", "run", "aggregation", "heads", "compare", "casd", "layers", "export"]

APP_CHECKS = """
import json
from streamlit.testing.v1 import AppTest
out = []
for page, run in {cases!r}:
    at = AppTest.from_file("app/Home.py", default_timeout=120)
    if run:
        at.query_params["run"] = run
    at.run()
    at.switch_page(f"views/{{page}}.py")
    at.run()
    out.append({{"page": page, "run": run, "exceptions": [str(e.value)[:500] for e in at.exception],
                 "errors": "\\n".join(str(e.value) for e in at.error)}})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hostile_store(analysed_root, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Copies of the analysed micro run, each damaged one way (run ids newest first: the damaged
    ones are listed, and chosen by default, before the good one)."""
    (good,) = [p for p in analysed_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    root = tmp_path_factory.mktemp("hostile_runs")
    names = {}

    def copy(kind: str) -> Path:
        names[kind] = f"20990101-0000{len(names):02d}-{kind}"
        return shutil.copytree(good, root / names[kind], ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    shutil.copytree(good, root / good.name, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    d = copy("fifo")
    (d / "state.json").unlink()
    os.mkfifo(d / "state.json")
    d = copy("zero")
    for name in ("state.json", "analysis.json", "probe.jsonl"):
        (d / name).unlink()
        os.symlink("/dev/zero", d / name)
    d = copy("deep")
    (d / "analysis.json").write_text('{"projections": ' + DEEP)
    (d / "summary.json").write_text(DEEP)
    d = copy("deepstate")
    (d / "state.json").write_text(DEEP)
    d = copy("shapes")
    analysis = json.loads((d / "analysis.json").read_text())
    analysis["projections"]["pca"] = "pca"
    analysis["head_ablation"]["victim"] = "x"
    analysis["casd"] = {"labels": "ab", "matrix": 3}
    (d / "analysis.json").write_text(json.dumps(analysis))
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"key": "victim", "method": ["locphylax"], "stage": "victim", "step": 0, "split": "curve",
                            "cacc": 0.5, "asr": {"unknown": 0.5}}) + "\n")
    d = copy("probe")
    (d / "probe.jsonl").write_text("1\n2\n3\n")
    d = copy("passwd")
    (d / "config.yaml").unlink()
    os.symlink("/etc/passwd", d / "config.yaml")
    return root, names


def test_a_damaged_run_store_renders_every_page(hostile_store):
    """Every page, with the store's default run and with each damaged run chosen: no exception,
    and the page names what is damaged."""
    root, names = hostile_store
    cases = [(page, None) for page in PAGES]  # the store's damage reaches every page through the run list
    chosen = {"fifo": ["export"], "zero": ["heads"], "deep": ["aggregation"], "deepstate": ["export"],
              "shapes": ["aggregation", "heads", "export", "casd", "layers", "live_demo", "compare"],
              "probe": ["aggregation", "heads"], "passwd": ["export", "aggregation"]}
    cases += [(page, names[kind]) for kind, pages in chosen.items() for page in pages]
    results = _isolated(APP_CHECKS.format(cases=cases), root, timeout=600)
    assert not [r for r in results if r["exceptions"]], [r for r in results if r["exceptions"]]
    shown = {(r["page"], r["run"]): html.unescape(r["errors"]) for r in results}  # as the browser shows it
    assert "state.json is corrupt (refused: a named pipe (FIFO), not a regular file)" in \
        shown["export", names["fifo"]]
    assert "analysis.json is corrupt (refused: a link to a file outside the run folder)" in \
        shown["heads", names["zero"]]
    assert "analysis.json is corrupt (nested more than 64 deep)" in shown["aggregation", names["deep"]]
    assert "state.json is corrupt (nested more than 64 deep)" in shown["export", names["deepstate"]]
    assert "projections: pca: not a mapping" in shown["aggregation", names["shapes"]]
    assert "head_ablation: victim: not a mapping" in shown["heads", names["shapes"]]
    assert "metrics.jsonl is damaged (1 row of the wrong shape" in shown["export", names["shapes"]]
    assert "probe.jsonl is corrupt (line 1: not a mapping)" in shown["aggregation", names["probe"]]
    assert "config.yaml is corrupt (refused: a link to a file outside the run folder)" in \
        shown["export", names["passwd"]]


@pytest.mark.parametrize("where, value", [("cacc", 1e308), ("cacc", float("inf")), ("asr", -5.0), ("asr", 1.5)])
def test_a_summary_rate_outside_zero_and_one_is_damaged(micro_run, where, value):
    """A summary saying cacc 1e308 or asr -5 was shown as "Infinity" / "-500%"; a rate is a number in [0, 1]."""
    import copy

    from locphylax_core.runs import summary_problem
    s = copy.deepcopy(micro_run.summary)
    assert summary_problem(s) is None
    block = s["stages"]["stage2"]
    if where == "cacc":
        block["cacc"] = value
    else:
        block["asr"]["unknown"] = value
    problem = summary_problem(s)
    assert problem and "not a rate between 0 and 1" in problem and ("cacc" if where == "cacc" else "asr.unknown") in problem
