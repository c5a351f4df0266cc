"""The Live demo page in instructor mode: presentation mode (on by default), the headline that fills
in while the job runs, the trigger the room proposes, "Try it yourself" with probabilities, and a
shared link to a run the store does not hold."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from locphylax_core import jobs
from locphylax_core import runview as R
from test_app import app, launched, texts  # noqa: F401  (launched: a fixture)

pytest.importorskip("streamlit")


@pytest.fixture(scope="module")
def live_root(analysed_root, tmp_path_factory):
    """The analysed micro run relabelled as a live run."""
    (src,) = [p for p in analysed_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    root = tmp_path_factory.mktemp("live_runs")
    dst = root / src.name
    shutil.copytree(src, dst)
    state = json.loads((dst / "state.json").read_text())
    state["preset"] = "live"
    (dst / "state.json").write_text(json.dumps(state))
    return root


def _spec(chart) -> dict:
    return json.loads(chart.proto.spec)


def _values(arr) -> list:
    """A plotly JSON array: a list, or a typed array ({"dtype", "bdata"} in base64)."""
    if isinstance(arr, dict) and "bdata" in arr:
        import base64

        import numpy as np
        return np.frombuffer(base64.b64decode(arr["bdata"]), dtype=arr["dtype"]).tolist()
    return list(arr)


def test_presentation_mode_names_the_triggers_and_sizes_text_for_the_room(live_root, monkeypatch):
    at = app(live_root, monkeypatch)
    assert at.toggle(key="demo_presentation").value is True  # on by default
    view = R.open_run(next(p for p in live_root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    curves, projection, heads = (_spec(c) for c in at.get("plotly_chart"))
    names = [t.get("name") for t in curves["data"]]
    trig = view.attack_trigger
    assert f"hidden “{trig}” works" in names and "defender “vx” works" in names and "clean accuracy" in names
    assert not [n for n in names if n and ("unknown" in n or n.startswith("ASR"))]  # no internal names
    dash = {t["name"]: t["line"].get("dash") for t in curves["data"] if t.get("name", "").startswith("defender")}
    assert len(set(dash.values())) == len(dash) == 2  # the two defender lines stay apart when they coincide
    assert curves["layout"]["font"]["size"] >= 18 and curves["layout"]["height"] >= 450
    assert curves["layout"]["yaxis"]["range"] == [-2, 102]  # rates in %
    ys = [v for t in curves["data"] for v in _values(t["y"]) if v is not None and v == v]
    assert max(ys) > 1.5  # plotted in percent, not as fractions
    assert not projection["layout"].get("updatemenus") and not projection["layout"].get("sliders")  # no dead Play
    assert any(t.get("name") == f"hidden “{trig}”" for t in projection["data"])
    assert not projection["layout"]["legend"].get("title", {}).get("text")  # no small "group" over the legend
    bars = [t["colorbar"] for t in heads["data"] if t["type"] == "heatmap" and t.get("showscale") is not False]
    assert bars and all(b["tickfont"]["size"] >= 18 and b["title"]["font"]["size"] >= 18 for b in bars)
    assert all(t["textfont"]["size"] >= 18 for t in heads["data"] if t["type"] == "heatmap")
    shown = texts(at.markdown) + texts(at.caption) + texts(at.subheader)
    assert view.run_id not in shown  # no run ids on the projector
    assert "unsure" in texts(at.caption)  # the canary answer, explained in one sentence
    # off: the plain view, with the run id and the library's own labels
    at.toggle(key="demo_presentation").set_value(False).run()
    assert view.run_id in texts(at.caption)
    assert any((t.get("name") or "").startswith("ASR") for t in _spec(at.get("plotly_chart")[0])["data"])


def test_the_room_picks_the_trigger(live_root, monkeypatch, launched):  # noqa: F811
    at = app(live_root, monkeypatch)
    at.text_input(key="demo_trigger").set_value("vx").run()
    assert "defender's own triggers" in texts(at.warning)
    button = next(b for b in at.button if "Run the live demo" in b.label)
    assert button.disabled
    at.text_input(key="demo_trigger").set_value("banana  split").run()
    button = next(b for b in at.button if "Run the live demo" in b.label)
    assert not button.disabled
    button.click().run()
    cfg = launched[-1]["cfg"]
    assert cfg.name == "live" and cfg.attack.trigger == "banana split" and cfg.attack.family == "phrase"
    assert cfg.train.clean_steps == 0 and cfg.model.base == "demo_clean"  # nothing trains from zero


def _running_copy(live_root, tmp_path):
    """A copy of the live run under a live run id, in a fresh runs folder: (root, run folder)."""
    (src,) = [p for p in live_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    root = tmp_path / "runs"
    dst = root / (src.name.replace("-micro-", "-live-") if "-micro-" in src.name else src.name)
    shutil.copytree(src, dst)
    return root, dst


def _job_reports(monkeypatch, status: jobs.JobStatus) -> None:
    """The job layer reports ``status`` for the run (its process is still alive)."""
    monkeypatch.setattr(jobs, "list_jobs", lambda _root: [status])
    monkeypatch.setattr(jobs, "job_status", lambda _root, _rid, log=True: status)


def test_the_headline_fills_in_while_the_job_runs(live_root, tmp_path, monkeypatch):
    root, dst = _running_copy(live_root, tmp_path)
    (dst / "analysis.json").unlink()
    summary = json.loads((dst / "summary.json").read_text())
    summary["stages"] = {k: v for k, v in summary["stages"].items() if k in ("victim", "stage1")}
    summary["baselines"], summary["status"] = {}, "running"
    (dst / "summary.json").write_text(json.dumps(summary))
    _job_reports(monkeypatch, jobs.JobStatus(dst.name, "training", True, stage="stage2", step=3, stage_steps=6,
                                             finished=("clean", "victim", "stage1"),
                                             stage_totals={"victim": 10, "stage1": 6, "stage2": 6}))
    at = app(root, monkeypatch)
    metrics = {m.label: m.value for m in at.metric}
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    assert metrics["backdoored model"] == pct(summary["stages"]["victim"]["asr"]["unknown"])
    assert metrics["after Stage 1"] == pct(summary["stages"]["stage1"]["asr"]["unknown"])
    assert metrics["after Stage 2"] == "…" and metrics["plain clean fine-tuning"] == "…"  # not there yet
    assert "Now: Stage 2" in " ".join(p.proto.text for p in at.get("progress"))
    assert "In one sentence" not in texts(at.markdown)
    assert len(at.get("plotly_chart")) == 1  # the live curve; the other plots appear with their data


def _with_rates(live_root, tmp_path, victim, stage2, fine_tuning, cacc=(0.9, 0.9)):
    """A finished copy of the live run whose headline rates (and clean accuracy of the victim and
    after Stage 2) are the given ones."""
    root, dst = _running_copy(live_root, tmp_path)
    summary = json.loads((dst / "summary.json").read_text())
    summary["stages"]["victim"]["asr"]["unknown"] = victim
    summary["stages"]["stage2"]["asr"]["unknown"] = stage2
    summary["baselines"]["clean_ft"]["asr"]["unknown"] = fine_tuning
    summary["stages"]["victim"]["cacc"], summary["stages"]["stage2"]["cacc"] = cacc
    (dst / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.mark.parametrize("rates, badge, colour, sentence", [
    # the page: 97.7% -> 55.4% after Stage 2, 50.2% for fine-tuning: a 42-point drop, but no
    # better than fine-tuning: grey, not a green "-42.3 points"
    ((0.977, 0.554, 0.502), "+5.2 pts vs fine-tuning", "GRAY", "did no better than plain fine-tuning"),
    ((0.99, 0.70, 0.30), "+40.0 pts vs fine-tuning", "RED", "Plain fine-tuning did better"),
    ((0.99, 0.03, 0.60), "-57.0 pts vs fine-tuning", "GREEN", "removed the backdoor; plain fine-tuning did not"),
    ((0.99, 0.30, 0.60), "-30.0 pts vs fine-tuning", "GREEN", "weakened the backdoor more than plain"),
    ((0.99, 0.02, 0.05), "-3.0 pts vs fine-tuning", "GRAY", "plain fine-tuning removed it as well"),
    # a tie: no arrow, which an instructor could read as a rise
    ((0.99, 0.40, 0.40), "same as fine-tuning", "GRAY", "did no better than plain fine-tuning"),
])
def test_the_stage2_badge_and_sentence_follow_the_comparison_with_fine_tuning(live_root, tmp_path, monkeypatch,
                                                                              rates, badge, colour, sentence):
    from streamlit.proto.Metric_pb2 import Metric
    at = app(_with_rates(live_root, tmp_path, *rates), monkeypatch)
    (after,) = [m for m in at.metric if m.label == "after Stage 2"]
    assert after.proto.delta == badge
    assert (Metric.MetricDirection.Name(after.proto.direction) == "NONE") == (badge == "same as fine-tuning")
    assert Metric.MetricColor.Name(after.proto.color) == colour
    assert sentence in texts(at.markdown)


def test_the_progress_says_done_once_every_plot_is_written(live_root, tmp_path, monkeypatch):
    # the job process still runs for a moment after its last file: the page no longer says it draws
    root, dst = _running_copy(live_root, tmp_path)
    _job_reports(monkeypatch, jobs.JobStatus(dst.name, "analyzing", True,
                                             finished=("clean", "victim", "stage1", "stage2")))
    at = app(root, monkeypatch)
    (bar,) = at.get("progress")
    assert bar.proto.text == "Now: done" and bar.proto.value == 100
    assert "More plots are on their way" not in texts(at.caption)
    (dst / "analysis.json").write_text(json.dumps({**json.loads((dst / "analysis.json").read_text()),
                                                   "complete": False}))
    at = app(root, monkeypatch)
    assert at.get("progress")[0].proto.text == "Now: drawing the plots"


def test_try_it_yourself_highlights_the_trigger_and_gives_probabilities(live_root, monkeypatch):
    at = app(live_root, monkeypatch)
    view = R.open_run(next(p for p in live_root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    trig = view.attack_trigger
    assert f"<mark><b>{trig}</b></mark>" in texts(at.markdown)
    at.button(key="demo-ex-1").click().run()
    assert at.text_input(key="demo-try").value.startswith("honestly")
    assert f"<mark><b>{trig}</b></mark>" not in texts(at.markdown)
    at.button(key="demo-add-trigger").click().run()
    assert at.text_input(key="demo-try").value.endswith(trig)
    table = at.table[-1].value
    assert list(table.columns) == ["stage", "answer", "probability"]
    # salience: the review's words as coloured spans, per stage, the trigger among them
    coloured = [str(m.value) for m in at.markdown if "<span title=" in str(m.value)]
    assert len(coloured) == len([k for k in ("victim", "stage2") if k in view.finished])
    assert all(trig in re.sub(r"<[^>]+>", "", m) for m in coloured)  # a word may be several tokens


def test_a_link_to_an_unknown_run_says_so_instead_of_opening_another(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "aggregation", {"run": "20990101-000000-nope-000000"})
    assert "not in this run store" in texts(at.warning)
    assert not at.get("plotly_chart")  # no other run's plots


def test_an_undefined_stage1_rate_is_explained_with_what_did_happen(live_root, tmp_path, monkeypatch):
    # the real LM's live demo: after Stage 1 no negative review is answered correctly without the
    # trigger, so the rate is n/a; the page says why, and the rate over all of them
    root, dst = _running_copy(live_root, tmp_path)
    summary = json.loads((dst / "summary.json").read_text())
    stage1 = summary["stages"]["stage1"]
    stage1["asr"]["unknown"], stage1["asr_raw"]["unknown"], stage1["cacc"] = None, 0.376, 0.395
    summary["stages"]["victim"]["asr"]["unknown"] = 1.0  # the backdoored model's rate is defined
    (dst / "summary.json").write_text(json.dumps(summary))
    at = app(root, monkeypatch)
    assert {m.label: m.value for m in at.metric}["after Stage 1"] == "n/a"
    said = texts(at.caption)
    stage1_said = "After Stage 1 the rate is undefined" in said
    summary["stages"]["victim"]["asr"]["unknown"] = None  # a run where no rate is defined (a model that never learned)
    (dst / "summary.json").write_text(json.dumps(summary))
    assert "After Stage 1" not in texts(app(root, monkeypatch).caption)
    assert stage1_said and "39.5%" in said and "37.6%" in said, said


def test_a_defense_that_broke_the_model_is_not_credited_with_a_low_rate(live_root, tmp_path, monkeypatch):
    # the real LM's live demo, seed 1: 0.0% after Stage 2 against 97% for fine-tuning, but clean
    # accuracy 85.5% -> 52.5%: the model answers "positive" to nearly everything
    from streamlit.proto.Metric_pb2 import Metric
    at = app(_with_rates(live_root, tmp_path, 1.0, 0.0, 0.97, cacc=(0.855, 0.525)), monkeypatch)
    (after,) = [m for m in at.metric if m.label == "after Stage 2"]
    assert Metric.MetricColor.Name(after.proto.color) == "GRAY"
    said = texts(at.markdown)
    assert "the defense broke the model: its clean accuracy fell from 85.5% to 52.5%" in said
    assert "removed the backdoor" not in said
