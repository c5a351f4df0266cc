"""The `locphylax` command line, run as `python -m locphylax_core.cli` from the repository root."""

from __future__ import annotations

import json

from conftest import REPO, cli, cli_in_process
from locphylax_core.cli import main


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    root = tmp_path / "runs"
    repo_runs_before = _tree(REPO / "runs")
    res = cli("--runs", str(root), "run", "micro", "--dry-run", "--set", "attack.position=start")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "plan:" in out
    for key in ("clean", "victim", "stage1", "stage2", "clean_ft/stage1", "unlearn_single/stage2",
                "no_cluster/stage2"):
        assert key in out
    assert "method=locphylax" in out and "from=victim" in out and "from=fresh model" in out
    assert "config is valid (dry run: nothing trained, nothing written)" in out
    assert "position: start" in out  # the printed config carries the override
    assert not root.exists()
    assert _tree(REPO / "runs") == repo_runs_before
    assert list(tmp_path.iterdir()) == []


def test_bad_override_exits_2_naming_the_field(tmp_path):
    root = tmp_path / "runs"
    res = cli("--runs", str(root), "run", "micro", "--set", "attack.poison_rate=2")
    assert res.returncode == 2
    assert "attack.poison_rate" in res.stderr and "(0, 1]" in res.stderr
    assert res.stderr.startswith("error:")
    assert "Traceback" not in res.stderr
    assert not root.exists()


# The two above run the command in a new interpreter (its exit status and streams as a shell sees
# them); the cases below call the CLI's main() in-process (same code path, no interpreter start-up).


def test_unknown_preset_exits_2(tmp_path, capsys):
    assert main(["--runs", str(tmp_path / "runs"), "run", "nonexistent_preset", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nonexistent_preset'" in err and "micro" in err


def test_runs_lists_the_run(micro_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no truncated cells
    rc, out = cli_in_process(capsys, "--runs", str(micro_run.root), "runs")
    assert rc == 0, out
    line = next(line for line in out.splitlines() if micro_run.path.name in line)
    assert "micro" in line and "done" in line and "10" in line  # 10 finished stages


def test_runs_on_an_empty_store(tmp_path, capsys):
    assert main(["--runs", str(tmp_path / "empty"), "runs"]) == 0
    assert "no runs in" in capsys.readouterr().out


def _pct(x):
    return "n/a" if x is None else f"{100 * x:5.1f}%".strip()


def test_show_prints_the_results_table(micro_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc, out = cli_in_process(capsys, "--runs", str(micro_run.root), "show", micro_run.path.name)
    assert rc == 0, out
    s = micro_run.summary
    rows = {"victim": s["stages"]["victim"], "Stage 1": s["stages"]["stage1"],
            "Stage 2 (Locphylax)": s["stages"]["stage2"],
            **{f"baseline: {m}": b for m, b in s["baselines"].items()}}
    lines = out.splitlines()
    for label, block in rows.items():
        line = next((ln for ln in lines if f" {label} " in ln), None)
        assert line is not None, (label, out)
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        assert cells[0] == label
        assert cells[1] == _pct(block["cacc"])
        assert cells[2] == _pct(block["asr"]["unknown"])
        assert cells[3] == _pct(block["asr"]["t1"])
        assert cells[4] == _pct(block["asr"]["t2"])
    for header in ("CACC", "ASR unknown", "ASR t1", "ASR t2", "seconds"):
        assert header in out
    assert micro_run.path.name in out and "raw ASR" in out


def test_show_json_and_prefix(micro_run, capsys):
    assert main(["--runs", str(micro_run.root), "show", micro_run.path.name[:-2], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == micro_run.summary


def test_show_unknown_run(tmp_path, capsys):
    assert main(["--runs", str(tmp_path), "show", "missing-run"]) == 2
    assert "no run 'missing-run'" in capsys.readouterr().err


def test_show_json_in_process(micro_run, capsys):
    assert main(["--runs", str(micro_run.root), "show", micro_run.path.name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"] == micro_run.summary["stages"]
