"""Every page of the Streamlit app, driven by streamlit.testing's AppTest on a micro run: the
widgets and the numbers they show, inline validation errors, job start / re-attach / cancel, and
damaged run folders."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_shared
from locphylax_core import jobs, load_config
from locphylax_core import runview as R

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HOME = str(REPO / "app" / "Home.py")


def app(root: Path, monkeypatch, page: str | None = None, query: dict | None = None,
        model: str | None = "live") -> AppTest:
    """A fresh browser session on the run store ``root``, switched to ``views/<page>.py``; ``query``
    is the URL's query string (a shared link). The Live demo (the first page, run before any other)
    shows the tiny model's runs (``?model=live``), which the tests' stored runs stand for, unless
    ``model`` says otherwise (None: the page's own default)."""
    monkeypatch.setenv("LOCPHYLAX_RUNS", str(root))
    at = AppTest.from_file(HOME, default_timeout=120)
    at.query_params.update({"model": model} if model and "model" not in (query or {}) else {})
    at.query_params.update(query or {})
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.fixture(scope="module")
def run_view(analysed_root):
    (path,) = [p for p in analysed_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return R.open_run(path)


@pytest.fixture()
def launched(monkeypatch):
    """Record jobs the pages would start instead of starting them."""
    calls = []

    def fake_launch(cfg, runs_root, *, analyze=True, resume=None, threads=None):
        calls.append({"cfg": cfg, "root": Path(runs_root), "resume": resume})
        return resume or f"fake-{len(calls)}"
    monkeypatch.setattr(jobs, "launch", fake_launch)
    return calls


def test_live_demo_offers_one_click_when_no_demo_run_is_stored(analysed_root, monkeypatch, launched):
    at = app(analysed_root, monkeypatch, model=None)  # the page's default: the real LM
    assert at.sidebar.radio[0].value == "live-smollm2"
    assert "No demo run is stored yet" in texts(at.info)
    (button,) = [b for b in at.button if "Run the live demo" in b.label]
    button.click().run()
    assert len(launched) == 1 and launched[0]["cfg"].name == "live-smollm2"
    assert launched[0]["cfg"].attack.trigger == "cf"
    assert launched[0]["root"] == analysed_root


def test_the_tiny_model_is_the_fast_option(analysed_root, monkeypatch, launched):
    at = app(analysed_root, monkeypatch)  # ?model=live
    (button,) = [b for b in at.button if "Run the live demo" in b.label]
    button.click().run()
    assert launched[0]["cfg"].name == "live"  # from the shipped clean model


def test_the_live_demo_runs_the_real_lm_when_the_room_picks_it_and_a_link_keeps_the_choice(analysed_root, monkeypatch,
                                                                                            launched):
    at = app(analysed_root, monkeypatch, query={"model": "live-smollm2"})
    assert at.sidebar.radio[0].value == "live-smollm2"
    assert "real pretrained language model (SmolLM2" in texts(at.markdown)
    (button,) = [b for b in at.button if "Run the live demo" in b.label]
    button.click().run()
    assert launched[0]["cfg"].name == "live-smollm2" and launched[0]["cfg"].model.base == "smollm2-135m"
    assert at.query_params["model"] in ("live-smollm2", ["live-smollm2"])
    at.sidebar.radio[0].set_value("live").run()  # the tiny model: the fast option
    assert at.query_params["model"] in ("live", ["live"])


def test_a_link_to_an_unknown_demo_model_falls_back_and_says_so(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, query={"model": "gpt-5"})
    assert at.sidebar.radio[0].value == "live-smollm2"
    assert "is not a demo model of this app" in texts(at.info)


def test_a_pinned_demo_preset_may_be_a_yaml_file_and_one_that_cannot_load_is_named(analysed_root, monkeypatch,
                                                                                 launched, tmp_path):
    preset = tmp_path / "short.yaml"
    preset.write_text((REPO / "configs" / "live.yaml").read_text().replace("stage2_steps:", "stage2_steps: 3 #"))
    monkeypatch.setenv("LOCPHYLAX_LIVE_PRESET", str(preset))
    at = app(analysed_root, monkeypatch, model=None)
    assert not at.sidebar.radio  # pinned: no choice of model
    (button,) = [b for b in at.button if "Run the live demo" in b.label]
    button.click().run()
    assert launched[0]["cfg"].name == "live" and launched[0]["cfg"].defense.stage2_steps == 3
    monkeypatch.setenv("LOCPHYLAX_LIVE_PRESET", str(tmp_path / "absent.yaml"))
    at = app(analysed_root, monkeypatch, model=None)
    assert "LOCPHYLAX_LIVE_PRESET names no usable preset" in texts(at.error)
    assert "absent.yaml" in texts(at.error)


@pytest.fixture(scope="module")
def demo_root(run_view, tmp_path_factory):
    """The analysed micro run relabelled as a demo run, for the instructor page."""
    root = tmp_path_factory.mktemp("demo_runs")
    dst = root / run_view.run_id
    shutil.copytree(run_view.path, dst)
    state = json.loads((dst / "state.json").read_text())
    state["preset"] = "demo"
    (dst / "state.json").write_text(json.dumps(state))
    return root


def test_live_demo_shows_the_collapse_in_plain_sentences(demo_root, run_view, monkeypatch):
    at = app(demo_root, monkeypatch)
    s = run_view.summary
    metrics = {m.label: m.value for m in at.metric}
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    assert metrics["backdoored model"] == pct(s["stages"]["victim"]["asr"]["unknown"])
    assert metrics["after Stage 2"] == pct(s["stages"]["stage2"]["asr"]["unknown"])
    assert metrics["plain clean fine-tuning"] == pct(s["baselines"]["clean_ft"]["asr"]["unknown"])
    sentence = texts(at.markdown)
    assert f"went from {pct(s['stages']['victim']['cacc'])} to {pct(s['stages']['stage2']['cacc'])}" in sentence
    assert len(at.get("plotly_chart")) == 3  # curves, projection, heads
    curves = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]
    assert curves["yaxis"]["title"]["text"] == "%" and curves["yaxis"]["title"]["font"]["size"] >= 18  # projected
    assert "Each dot is one review" in texts(at.caption)
    # "Try it yourself": one answer per stage, from the run's own label words, with its probability
    table = at.table[-1].value
    assert list(table["stage"]) == ["victim", "after Stage 1", "after Stage 2 (Locphylax)"]
    assert set(table["answer"]) <= set(run_view.label_words)
    assert all(p.endswith("%") and 0 < float(p[:-1]) <= 100 for p in table["probability"])


def test_live_demo_plants_the_backdoor_of_the_trigger_in_the_box_before_the_click(run_view, tmp_path, monkeypatch):
    """The waiting job process builds the backdoored model for the trigger in the box, and tries plain
    fine-tuning on it, while the instructor talks (jobs.prepare); the page says so, then shows what
    the planted backdoor does and what plain fine-tuning leaves of it."""
    root = tmp_path / "runs"
    prepared = root / "prep-1"
    shutil.copytree(run_view.path, prepared)
    state = json.loads((prepared / "state.json").read_text())
    (prepared / "state.json").write_text(json.dumps({**state, "status": "prepared", "preset": "live"}))
    asked, ready = [], {"now": False}
    monkeypatch.setenv("LOCPHYLAX_STANDBY", "1")
    monkeypatch.setattr(jobs, "ensure_standby", lambda _root: True)
    monkeypatch.setattr(jobs, "standby_alive", lambda _root: True)
    monkeypatch.setattr(jobs, "prepare", lambda cfg, _root, stop_after: asked.append((cfg, stop_after)) or "prep-1")
    monkeypatch.setattr(jobs, "prepared_run", lambda _root, cfg: ("prep-1", ready["now"]))
    at = app(root, monkeypatch)
    assert asked and asked[-1][0].name == "live" and asked[-1][0].attack.trigger == "cf"
    assert asked[-1][1] == "clean_ft/stage2"  # the backdoor and the contrast, not the defense
    assert "Planting the backdoor “cf” and trying plain fine-tuning on it while the page waits" in texts(at.caption)
    ready["now"] = True
    at.run()
    victim = run_view.summary["stages"]["victim"]
    said = texts(at.success)
    assert "Ready: the backdoor “cf” is planted." in said and "One click runs the defense." in said
    if victim["asr"]["unknown"] is not None:  # the micro victim's may be undefined
        assert f"It fools the backdoored model on {100 * victim['asr']['unknown']:.1f}%" in said
    contrast = run_view.summary["baselines"]["clean_ft"]["asr"]["unknown"]
    assert f"plain fine-tuning on clean reviews leaves it at {100 * contrast:.1f}%" in said
    assert not any("No demo run is stored yet" in t for t in texts(at.info))  # "Ready" is what the room reads
    assert not at.exception, [e.value for e in at.exception]
    # the room proposes another trigger: that one is planted instead
    at.text_input(key="demo_trigger").set_value("as if").run()
    assert asked[-1][0].attack.trigger == "as if" and asked[-1][0].attack.family == "phrase"
    # the run shown already is that very configuration: nothing is planted again
    asked.clear()
    shown = root / "shown-1"
    shutil.copytree(run_view.path, shown)
    cfg = load_config("live", {"attack.trigger": "cf", "attack.family": "word"})
    (shown / "state.json").write_text(json.dumps({**state, "preset": "live", "config_sha256": cfg.sha256()}))
    at = app(root, monkeypatch)
    assert asked == [] and "Ready: the backdoor" not in texts(at.success)


def test_a_failed_run_of_the_demo_is_said_and_not_planted_again_and_again(run_view, tmp_path, monkeypatch):
    """A run of the trigger in the box failed (planted ahead or clicked; here: a full disk): the page
    names it and its error, and does not ask the waiting process to plant the same configuration
    again (every poll did, and each attempt left another failed run folder)."""
    root = tmp_path / "runs"
    failed = root / "20261207-221812-live-b794f9"
    shutil.copytree(run_view.path, failed)
    state = json.loads((failed / "state.json").read_text())
    cfg = load_config("live", {"attack.trigger": "cf", "attack.family": "word"})
    error = "OSError: [Errno 28] No space left on device: 'checkpoints/stage2'"
    (failed / "state.json").write_text(json.dumps({**state, "status": "failed", "preset": "live", "error": error,
                                                   "config_sha256": cfg.sha256()}))
    asked = []
    monkeypatch.setenv("LOCPHYLAX_STANDBY", "1")
    monkeypatch.setattr(jobs, "ensure_standby", lambda _root: True)
    monkeypatch.setattr(jobs, "standby_alive", lambda _root: True)
    monkeypatch.setattr(jobs, "prepare", lambda cfg, _root, stop_after: asked.append(cfg) or "prep-2")
    monkeypatch.setattr(jobs, "prepared_run", lambda _root, cfg: ("prep-2", False))
    at = app(root, monkeypatch)
    said = texts(at.error)
    assert "The last run of this demo" in said and failed.name in said and "No space left on device" in said
    assert asked == [] and not at.exception
    # another trigger has no failed run: it is planted as usual
    at.text_input(key="demo_trigger").set_value("zq").run()
    assert [c.attack.trigger for c in asked][-1:] == ["zq"]

def test_setup_shows_validation_errors_beside_the_field(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "setup")
    at.selectbox(key="setup_preset").set_value("micro").run()
    at.number_input(key="f-micro-attack-poison_rate").set_value(2.0)
    at.number_input(key="f-micro-defense-stage1_steps").set_value(0)
    [b for b in at.button if b.label == "Validate"][0].click().run()
    errors = texts(at.error)
    assert "`attack.poison_rate`: must be in (0, 1] (got 2.0)" in errors
    assert "`defense.stage1_steps`" in errors and "greater than or equal to 1" in errors
    assert not at.success
    # fixing the fields gives a valid configuration naming what changed
    at.number_input(key="f-micro-attack-poison_rate").set_value(0.3)
    at.number_input(key="f-micro-defense-stage1_steps").set_value(4)
    [b for b in at.button if b.label == "Validate"][0].click().run()
    assert not at.error, texts(at.error)
    ok = texts(at.success)
    assert "Valid configuration" in ok and "`attack.poison_rate`" in ok and "`defense.stage1_steps`" in ok
    assert "poison_rate: 0.3" in texts(at.code)


def test_setup_starts_the_validated_run(analysed_root, monkeypatch, launched):
    at = app(analysed_root, monkeypatch, "setup")
    at.selectbox(key="setup_preset").set_value("micro").run()
    at.number_input(key="f-micro-seed").set_value(7)
    [b for b in at.button if b.label == "Validate"][0].click().run()
    at.button(key="setup_start").click().run()
    assert len(launched) == 1 and launched[0]["cfg"].seed == 7 and launched[0]["cfg"].name == "micro"


def test_run_page_starts_a_job_and_lists_stored_runs(analysed_root, run_view, monkeypatch, launched):
    at = app(analysed_root, monkeypatch, "run")
    at.selectbox(key="run_choice").set_value("micro").run()
    at.button(key="start_run").click().run()
    assert launched and launched[0]["cfg"] == load_config("micro")
    stored = at.dataframe[0].value
    assert run_view.run_id in list(stored["run"])


def test_run_page_reattaches_to_a_running_job_and_cancel_stops_it(tmp_path, monkeypatch):
    cfg = load_config("micro", {"train.clean_steps": 20000, "eval.clean_every": 50})
    run_id = jobs.launch(cfg, tmp_path, analyze=False)
    t0 = time.monotonic()
    while jobs.job_status(tmp_path, run_id).phase != "training" and time.monotonic() - t0 < 60:
        time.sleep(0.2)
    try:
        at = app(tmp_path, monkeypatch, "run")  # a fresh session: no state links it to the job
        assert f"Running: {run_id}" in texts(at.subheader)
        assert any("training" in str(m.value) and run_id in str(m.value) for m in at.markdown)
        (cancel,) = [b for b in at.button if b.label == "Cancel"]
        cancel.click().run()
        status = jobs.job_status(tmp_path, run_id)
        assert status.phase == "cancelled" and not status.alive
        assert f"Running: {run_id}" not in texts(at.subheader)
    finally:
        jobs.cancel(tmp_path, run_id, grace=10)


def test_aggregation_page_shows_the_projection_and_metrics(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "aggregation")
    assert at.radio(key="agg_method").options == ["PCA", "TSNE"]
    agg = run_view.analysis["aggregation"]

    def score(stage):
        v = agg[stage]["aggregation_score"]
        return "n/a" if v is None else f"{v:.3f}"
    metric = lambda: {m.label: m.value for m in at.metric}["aggregation score"]  # noqa: E731
    assert metric() == score("stage1")
    at.select_slider(key="agg_stage").set_value("victim").run()
    assert metric() == score("victim")
    at.radio(key="agg_method").set_value("pca").run()
    at.multiselect(key="agg_groups").set_value(["unknown"]).run()
    assert not at.exception and len(at.get("plotly_chart")) == 1
    assert "centroid distance" in texts(at.caption)


def test_heads_page_shows_one_head_and_the_critical_list(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "heads")
    assert len(at.get("plotly_chart")) == 1
    at.number_input(key="heads_head").set_value(1).run()
    one = at.dataframe[0].value
    grid = R.head_grids(run_view, "victim")["delta_asr_t1"]
    assert one.iloc[0]["ΔASR (t1)"] == pytest.approx(round(100 * grid[0, 1], 1))
    cacc = R.head_grids(run_view, "victim")["delta_cacc"]
    assert one.iloc[0]["ΔCACC"] == pytest.approx(round(100 * cacc[0, 1], 1))
    top = at.dataframe[1].value
    assert list(top.columns) == ["layer", "head", "ΔASR unknown (points)", "ΔCACC (points)"]
    at.selectbox(key="heads_quantity").set_value("delta_cacc").run()
    assert not at.exception


def test_compare_page_filters_runs_and_methods(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "compare")
    table = at.dataframe[0].value
    assert len(table) == len(R.results_table(run_view))
    assert len(at.get("plotly_chart")) == 1
    at.multiselect(key="cmp_rows").set_value(["victim", "clean fine-tuning"]).run()
    table = at.dataframe[0].value
    assert list(table["row"]) == ["victim", "clean fine-tuning"]
    assert table.iloc[0]["CACC %"] == round(100 * run_view.summary["stages"]["victim"]["cacc"], 1)


def test_export_page_offers_every_file(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "export")
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"projection_pca.html", "projection_tsne.html", "heads.html", "curves.html", "casd.html",
            "results.csv", "metrics.csv", "projection_tsne.csv", "heads.csv", "aggregation.csv",
            "summary.json", "config.yaml"} <= labels


@pytest.fixture(scope="module")
def damaged_root(run_view, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged_runs")
    corrupt = root / "20990101-000000-micro-corrupt"
    shutil.copytree(run_view.path, corrupt)
    (corrupt / "summary.json").write_text('{"schema": 1, "stages": {')
    (corrupt / "analysis.json").write_text("{ not json")
    half = root / "20990101-000001-micro-half"
    half.mkdir()
    (half / "config.yaml").write_text("name: micro\n")
    (half / "metrics.jsonl").write_text('{"key": "vic')
    return root, corrupt.name, half.name


@pytest.mark.parametrize("page", ["live_demo", "setup", "run", "aggregation", "heads", "compare", "export"])
@pytest.mark.parametrize("which", [1, 2])
def test_damaged_run_folders_never_crash_a_page(damaged_root, monkeypatch, page, which):
    root, corrupt, half = damaged_root
    run_id = (None, corrupt, half)[which]
    monkeypatch.setenv("LOCPHYLAX_RUNS", str(root))
    at = AppTest.from_file(HOME, default_timeout=120)
    at.query_params["run"] = run_id
    at.run()
    at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page in ("aggregation", "heads", "export"):
        shown = texts(at.error)
        assert run_id in shown and ("corrupt" in shown or "incomplete" in shown)
        if which == 1:
            assert "summary.json is corrupt" in shown
        else:
            assert "state.json is missing" in shown


def test_cached_views_are_copies(analysed_root, run_view, monkeypatch):
    """A page that changed what the cache returned would change it for every other session."""
    monkeypatch.setenv("LOCPHYLAX_RUNS", str(analysed_root))
    import sys
    sys.path.insert(0, str(Path(HOME).parent))
    import support as S
    a = S.load_view(run_view.path)
    a.summary["stages"]["victim"]["cacc"] = -1.0
    b = S.load_view(run_view.path)
    assert b.summary["stages"]["victim"]["cacc"] == run_view.summary["stages"]["victim"]["cacc"]
    c1, _ = S.projection(run_view, "pca")
    next(iter(c1.values()))[:] = np.nan
    c2, _ = S.projection(run_view, "pca")
    assert np.isfinite(next(iter(c2.values()))).all()


def test_setup_form_renders_every_preset(analysed_root, monkeypatch):
    from locphylax_core import list_presets
    at = app(analysed_root, monkeypatch, "setup")
    for preset in list_presets():
        at.selectbox(key="setup_preset").set_value(preset).run()
        assert not at.exception, (preset, [e.value for e in at.exception])
        cfg = load_config(preset)
        assert at.number_input(key=f"f-{preset}-attack-poison_rate").value == cfg.attack.poison_rate
        assert at.number_input(key=f"f-{preset}-task-max_words").value == cfg.task.max_words  # None stays empty


GENERATIVE_MICRO = {"model.base": "scratch", "model.n_layer": 1, "model.n_embd": 64, "model.n_head": 2, "model.n_positions": 96,
                    "model.vocab_size": 1200, "task.train_size": 300, "task.test_size": 20, "task.defender_size": 60,
                    "task.max_words": 16, "task.max_response_words": 8, "attack.steps": 20, "defense.stage1_steps": 4,
                    "defense.stage2_steps": 4, "defense.batch_size": 16, "defense.baselines": ["clean_ft"],
                    "train.batch_size": 32, "train.clean_steps": 30, "train.lm_loss_weight": 0.0, "train.threads": 1,
                    "eval.every": 100, "eval.clean_every": 1000, "eval.curve_examples": 10, "eval.max_new_tokens": 4,
                    "eval.probe_per_group": 4, "eval.batch_size": 64}


@pytest.fixture(scope="module")
def generative_root(tmp_path_factory):
    """An analysed micro jailbreak run (generative: perplexity instead of CACC)."""
    from locphylax_core import start_run
    from locphylax_core.analysis import analyze_run
    root = tmp_path_factory.mktemp("gen_runs")
    run, _ = start_run(load_config("jailbreak", GENERATIVE_MICRO), runs_root=root)
    analyze_run(run, methods=("pca",), n_probe_heads=8)
    return root


@needs_shared("advbench")
@pytest.mark.parametrize("page", ["setup", "run", "aggregation", "heads", "compare", "export"])
def test_a_generative_run_renders_on_every_page(generative_root, monkeypatch, page):
    at = app(generative_root, monkeypatch, page)
    if page == "compare":  # the utility of a generative run is its perplexity, shown as such
        (table,) = [d.value for d in at.dataframe if "perplexity" in d.value.columns]
        assert table["perplexity"].notna().all() and table["CACC %"].isna().all()


def test_the_live_demo_states_the_range_measured_beforehand_and_where_this_run_sits(demo_root, run_view, monkeypatch,
                                                                                    tmp_path):
    app(demo_root, monkeypatch)  # puts the app's folder on the path, as the pages import it
    import support
    runs = [{"seed": s, "trigger": "cf", "stage2": {"asr": a}, "clean_ft": {"asr": f}}
            for s, a, f in ((0, 0.02, 0.5), (1, 0.1, 0.8))]
    measured = {"preset": "demo", "machine": "a test CPU", "seeds": [0, 1], "triggers": ["cf"], "runs": runs,
                "range": {"stage2": {"asr": {"n": 2, "mean": 0.06, "min": 0.02, "max": 0.1},
                                     "cacc": {"n": 2, "mean": 0.65, "min": 0.525, "max": 0.775}},
                          "clean_ft": {"asr": {"n": 2, "mean": 0.65, "min": 0.5, "max": 0.8}}}}
    (tmp_path / "live_range_demo.json").write_text(json.dumps(measured))
    monkeypatch.setattr(support, "MEASURED_RANGES", tmp_path)
    support.measured_range.clear()
    at = app(demo_root, monkeypatch)
    said = texts(at.caption)
    assert ("Measured beforehand over 2 runs of this demo (2 seeds × 1 trigger, a test CPU): after Stage 2 the hidden "
            "trigger works on 2–10% (mean 6%) of the reviews, clean accuracy 52–78%, after plain clean fine-tuning on "
            "50–80% (mean 65%). This run:") in said
    s = run_view.summary
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    assert (f"This run: {pct(s['stages']['stage2']['asr']['unknown'])} and "
            f"{pct(s['baselines']['clean_ft']['asr']['unknown'])}.") in said


def test_the_measured_range_says_which_seeds_ran_on_which_trigger(demo_root, monkeypatch, tmp_path):
    app(demo_root, monkeypatch)
    import support
    runs = [{"seed": s, "trigger": t, "stage2": {"asr": 0.02}, "clean_ft": {"asr": 0.9}}
            for s, t in ((0, "cf"), (1, "cf"), (0, "§"))]
    spread = {"n": 3, "mean": 0.02, "min": 0.02, "max": 0.02}
    measured = {"preset": "demo", "machine": "a test CPU", "seeds": [0, 1], "triggers": ["cf", "§"], "runs": runs,
                "range": {"stage2": {"asr": spread}, "clean_ft": {"asr": {**spread, "mean": 0.9, "min": 0.9, "max": 0.9}}}}
    (tmp_path / "live_range_demo.json").write_text(json.dumps(measured))
    monkeypatch.setattr(support, "MEASURED_RANGES", tmp_path)
    support.measured_range.clear()
    said = texts(app(demo_root, monkeypatch).caption)
    assert "Measured beforehand over 3 runs of this demo (2 seeds on “cf”, 1 seed on “§”, a test CPU)" in said
