"""The Aggregation, Heads, Compare, CASD and Export pages: one source of truth for the stage, an
explained n/a, clickable heads, filters that keep new options, each row's own method, CASD with its
CSV, views kept in the URL; and the figures behind them (colour bars, printed values, curves)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from locphylax_core import runview as R
from locphylax_core.analysis import figures as F
from locphylax_core.registry import DEFENSES

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from test_app import app, texts  # noqa: E402


@pytest.fixture(scope="module")
def run_view(analysed_root):
    (path,) = [p for p in analysed_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return R.open_run(path)


def linked(root: Path, monkeypatch, page: str, **params) -> AppTest:
    """The app opened from a link: ?params= in the URL before the first run, then the page."""
    return app(root, monkeypatch, page, params)


def values(v) -> np.ndarray:
    """An array of a figure read back from JSON: plotly sends numeric arrays base64-encoded."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(n) for n in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v)


def drawn(at: AppTest, i: int = 0) -> go.Figure:
    """The plotly figure a page drew, read back from the JSON the browser gets."""
    return pio.from_json(at.get("plotly_chart")[i].proto.spec)


# ----------------------------------------------------------------------------------------------
# Figures


def toy_projection(n_stages: int = 3):
    probe = [{"text": f"s{i}", "group": g, "label": 0}
             for i, g in enumerate(["clean:a", "clean:b", "unknown", "known:t1"])]
    stages = ["victim", "stage1", "stage2", "clean_ft/stage1", "unlearn_single/stage2"][:n_stages]
    coords = {s: np.full((4, 2), float(k)) + np.arange(4)[:, None] for k, s in enumerate(stages)}
    preds = {s: np.zeros(4, int) for s in stages}
    return coords, probe, preds


def test_projection_without_animation_draws_only_the_stage_asked_for():
    coords, probe, preds = toy_projection()
    fig = F.projection_figure(coords, probe, preds, ["a"], "pca", active="stage1", animate=False)
    assert not fig.frames and not fig.layout.sliders and not fig.layout.updatemenus
    xs = np.concatenate([np.asarray(t.x, float) for t in fig.data])
    np.testing.assert_allclose(np.sort(xs), np.sort(coords["stage1"][:, 0]))
    assert fig.layout.title.text.endswith("after Stage 1")


def test_animated_projection_keeps_its_slider_readable_and_clear_of_the_axis_title():
    coords, probe, preds = toy_projection(5)
    fig = F.projection_figure(coords, probe, preds, ["a"], "tsne")
    (slider,) = fig.layout.sliders
    assert len(fig.frames) == 5 and len(slider.steps) == 5
    # short tick labels (the method on its own line), the full stage name in the frame's title
    assert all(max(len(part) for part in s.label.split("<br>")) <= 15 for s in slider.steps)
    assert fig.frames[3].layout.title.text.endswith("clean_ft (stage1)")
    # below the x-axis title, in room kept for it, and the buttons on the same row
    assert slider.pad.t >= 60 and fig.layout.margin.b >= 150
    assert fig.layout.updatemenus[0].y == slider.y and fig.layout.updatemenus[0].pad.t >= slider.pad.t
    assert F.projection_figure({"victim": coords["victim"]}, probe, preds, ["a"]).frames == ()  # nothing to animate


def test_head_heatmap_colour_bars_lie_under_the_panels_and_cells_print_points():
    before = np.array([[0.2, -0.1, np.nan], [0.0, 0.4, 0.003]])
    after = np.array([[0.1, -0.1, 0.0], [0.0, 0.0, -0.25]])
    fig = F.head_heatmaps(before, after)
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    bars = [t.colorbar for t in heat if t.showscale]
    assert len(bars) == 2  # one shared by before / after, one for the difference
    domains = [fig.layout.xaxis.domain, fig.layout.xaxis2.domain, fig.layout.xaxis3.domain]
    for bar, (lo, hi) in zip(bars, [(domains[0][0], domains[1][1]), domains[2]]):
        assert bar.orientation == "h" and bar.y < 0  # below the plots, not beside a panel
        assert lo - 1e-9 <= bar.x - bar.len / 2 and bar.x + bar.len / 2 <= hi + 1e-9
    assert fig.layout.margin.r >= 40  # the difference bar's last tick label ends past the plot's right edge
    assert heat[0].texttemplate == "%{text}"
    assert heat[0].text[0][0] == "+20" and heat[0].text[0][1] == "-10" and heat[0].text[0][2] == ""
    assert heat[0].text[1][2] == "0" and heat[2].text[1][1] == "-40"  # difference panel, in points
    np.testing.assert_allclose(np.asarray(heat[2].z), after - before)


def test_pickable_head_heatmaps_carry_each_cell_and_outline_the_chosen_one():
    grid = np.zeros((2, 3))
    fig = F.head_heatmaps(grid, grid, pickable=True, highlight=(1, 2))
    marks = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert len(marks) == 3  # one layer of clickable markers per panel
    assert sorted((c[0], c[1]) for c in marks[0].customdata) == [(a, b) for a in range(2) for b in range(3)]
    assert fig.layout.hoverdistance == -1  # a click anywhere in a cell reaches its marker
    assert len(fig.layout.shapes) == 3
    assert {(s.x0, s.x1, s.y0, s.y1) for s in fig.layout.shapes} == {(1.5, 2.5, 0.5, 1.5)}
    assert len(F.head_heatmaps(grid, grid).data) == 3  # exported figures stay plain


def curve_rows(methods: list[str]) -> list[dict]:
    rows = []

    def add(key, method, stage, steps, base):
        for s in steps:
            rows.append({"key": key, "method": method, "stage": stage, "step": s, "split": "curve",
                         "cacc": base, "asr": {"unknown": base / 2, "t1": base / 3, "t2": base / 4}})
    add("clean", "attack", "clean", [5, 10], 0.5)
    add("victim", "attack", "victim", [3, 6], 0.6)
    for i, m in enumerate(methods):
        prefix = "" if m == "locphylax" else f"{m}/"
        add(f"{prefix}stage1", m, "stage1", [2, 4], 0.1 * i)
        add(f"{prefix}stage2", m, "stage2", [2, 4], 0.1 * i + 0.05)
    return rows


def test_curves_draw_the_shared_part_once_and_keep_one_colour_per_quantity():
    methods = ["locphylax", "clean_ft", "unlearn_single", "no_cluster"]
    fig = F.curves_figure(curve_rows(methods), methods)
    lines = [t for t in fig.data if t.x is not None and t.x[0] is not None]  # not the legend's dash keys
    # the clean model's steps (global 5, 10) appear in exactly one trace per quantity
    with_clean = [t for t in lines if 5 in list(t.x)]
    assert sorted(t.name for t in with_clean) == ["ASR t1", "ASR t2", "ASR unknown", "CACC"]
    colour = {}
    for t in lines:
        quantity = t.name.split(" (")[0]
        colour.setdefault(quantity, set()).add(t.line.color)
    assert all(len(c) == 1 for c in colour.values()) and len({c.pop() for c in colour.values()}) == 4
    # methods differ by dash, each named once in the legend by its registry label
    dashes = {t.legendgroup: t.line.dash for t in fig.data if t.name in
              ["Locphylax", *[DEFENSES.label(m) for m in methods[1:]]]}
    assert len(dashes) == 4 and len(set(dashes.values())) == 4
    assert len(fig.layout.shapes) == 3  # stage boundaries still drawn


def test_single_method_curves_keep_the_live_demo_colours():
    fig = F.curves_figure(curve_rows(["locphylax"]), ["locphylax"])
    colours = {t.name: t.line.color for t in fig.data}
    assert colours["CACC"] == F.QUANTITY_COLORS["cacc"] and colours["ASR unknown"] == F.QUANTITY_COLORS["asr_unknown"]
    assert len(fig.data) == 4


def test_a_stage_after_a_victim_of_no_steps_keeps_its_marker():
    """A shipped victim is loaded, not trained: Stage 1 starts where it was planted, and the line
    there says Stage 1 (the page's "backdoor planted" mark would otherwise hide it)."""
    rows = [r for r in curve_rows(["locphylax"]) if r["stage"] != "victim"]
    rows.append({"key": "victim", "method": "attack", "stage": "victim", "step": 0, "split": "test",
                 "cacc": 0.8, "asr": {"unknown": 1.0, "t1": 0.0, "t2": 0.0}})
    fig = F.curves_figure(rows, ["locphylax"])
    assert [a.text for a in fig.layout.annotations] == ["stage1", "stage2"]


def test_casd_csv_names_its_training_column(run_view, tmp_path):
    from locphylax_core.analysis import export_figures
    casd = run_view.analysis["casd"]
    csv = F.casd_table(casd["labels"], casd["matrix"]).to_csv()
    assert csv.splitlines()[0] == "training," + ",".join(casd["labels"])
    written = export_figures(run_view.path, tmp_path / "figs", method="pca")
    (path,) = [p for p in written if p.name == "casd.csv"]
    assert path.read_text().splitlines()[0].startswith("training,")


# ----------------------------------------------------------------------------------------------
# Aggregation


def test_aggregation_figure_shows_the_stage_its_slider_names(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "aggregation")
    fig = drawn(at)
    assert not fig.frames and not fig.layout.sliders and not fig.layout.updatemenus
    assert fig.layout.title.text.endswith(F.stage_title("stage1"))
    at.select_slider(key="agg_stage").set_value("victim").run()
    fig = drawn(at)
    assert fig.layout.title.text.endswith("victim")
    coords, _ = R.projection(run_view, "tsne")
    xs = np.sort(np.concatenate([values(t.x).astype(float) for t in fig.data]))
    np.testing.assert_allclose(xs, np.sort(coords["victim"][:, 0]), rtol=1e-5)
    assert "Stage** slider" in texts(at.caption)


def test_aggregation_metrics_have_short_labels_with_help(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "aggregation")
    assert len(at.metric) >= 3
    for m in at.metric:
        assert len(m.label) <= 20 and m.proto.help, m.label


@pytest.fixture(scope="module")
def no_score_root(run_view, tmp_path_factory):
    """The micro run where, after Stage 1, the hidden-trigger inputs all get the canary answer,
    which no clean input gets: the aggregation score is undefined there."""
    from safetensors.numpy import load_file, save_file
    root = tmp_path_factory.mktemp("no_score_runs")
    dst = root / run_view.run_id
    shutil.copytree(run_view.path, dst)
    hidden = dst / "hidden" / "stage1.safetensors"
    arrays = dict(load_file(str(hidden)))
    groups = [r["group"] for r in run_view.probe]
    canary = run_view.label_words.index("unsure")
    arrays["pred"] = np.array([r["label"] if g.startswith("clean:") else canary
                               for r, g in zip(run_view.probe, groups)], np.int64)
    save_file(arrays, str(hidden))
    analysis = json.loads((dst / "analysis.json").read_text())
    analysis["aggregation"]["stage1"]["aggregation_score"] = None
    (dst / "analysis.json").write_text(json.dumps(analysis))
    return root


def test_aggregation_says_why_the_score_is_undefined(no_score_root, monkeypatch):
    at = app(no_score_root, monkeypatch, "aggregation")
    assert {m.label: m.value for m in at.metric}["aggregation score"] == "n/a"
    why = texts(at.caption)
    assert "only with clean inputs and defender-trigger inputs that got the same answer" in why
    assert "get “unsure”, which no clean input gets" in why


def test_aggregation_view_is_kept_in_the_url_and_a_link_restores_it(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "aggregation")
    at.radio(key="agg_method").set_value("pca").run()
    at.select_slider(key="agg_stage").set_value("clean_ft/stage2").run()
    at.multiselect(key="agg_groups").set_value(["unknown", "known:t1"]).run()
    params = dict(at.query_params)
    assert params["proj"] == "pca" and params["stage"] == "clean_ft/stage2"
    assert params["groups"] == ["unknown", "known:t1"] and params["run"] == run_view.run_id
    again = linked(analysed_root, monkeypatch, "aggregation", **params)
    assert again.radio(key="agg_method").value == "pca"
    assert again.select_slider(key="agg_stage").value == "clean_ft/stage2"
    assert again.multiselect(key="agg_groups").value == ["unknown", "known:t1"]
    assert not again.info


def test_aggregation_link_with_unknown_values_falls_back_with_a_note(analysed_root, monkeypatch):
    at = linked(analysed_root, monkeypatch, "aggregation", proj="umap", stage="stage9", groups=["zzz"])
    notes = texts(at.info)
    assert "projection `umap`" in notes and "showing TSNE" in notes
    assert "stage `stage9`" in notes and "showing after Stage 1" in notes
    assert "`zzz`" in notes
    assert at.radio(key="agg_method").value == "tsne" and at.select_slider(key="agg_stage").value == "stage1"
    assert len(at.multiselect(key="agg_groups").value) == 5


def test_projection_points_carry_their_probe_index_and_marked_points_are_ringed():
    coords, probe, preds = toy_projection(2)
    fig = F.projection_figure(coords, probe, preds, ["neg"], active="stage1", animate=False, marked=[2, 3])
    data = {t.name: t for t in fig.data}
    assert [int(c[3]) for c in data["unknown"].customdata] == [2]
    ring = data["found (2)"]
    assert [int(c[3]) for c in ring.customdata] == [2, 3]
    np.testing.assert_allclose(values(ring.x).astype(float), coords["stage1"][[2, 3], 0])
    assert ring.marker.line.color == "black"
    assert "found" not in {t.name for t in F.projection_figure(coords, probe, preds, ["neg"], animate=False).data}


def pick_points(at: AppTest, indices, key: str = "agg_fig") -> AppTest:
    """What the browser sends when points of a projection are clicked or lassoed."""
    at.session_state[key] = {"selection": {"points": [{"curve_number": 0, "point_index": k, "customdata":
                                                       ["text", "group", "answer", i]} for k, i in enumerate(indices)],
                                           "point_indices": list(range(len(indices))), "box": [], "lasso": []}}
    return at.run()


def test_aggregation_picked_points_fill_a_table_and_a_row_opens_the_inspector(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "aggregation")
    assert set(at.get("plotly_chart")[0].proto.selection_mode) >= {0, 1, 2}  # points, box, lasso
    unknown = [i for i, r in enumerate(run_view.probe) if r["group"] == "unknown"][:2]
    pick_points(at, unknown)
    assert not at.exception, [e.value for e in at.exception]
    rows = at.dataframe(key="agg_rows").value
    assert list(rows["index"]) == unknown
    assert list(rows["text"]) == [run_view.probe[i]["text"] for i in unknown]
    _, preds = R.projection(run_view, "tsne")
    assert list(rows[F.stage_title("stage1")]) == [run_view.label_words[int(preds["stage1"][i])] for i in unknown]
    at.session_state["agg_rows"] = {"selection": {"rows": [1], "columns": []}}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["point"] == str(unknown[1])
    assert f"**Input {unknown[1]}** (unknown" in texts(at.markdown)
    answers = at.table[0].value
    assert list(answers["stage"]) == [F.stage_title(k) for k in ("victim", "stage1", "stage2")]
    assert all(a in run_view.label_words for a in answers["answer"])
    assert all(p.endswith("%") and 0 <= int(p[:-1]) <= 100 for p in answers["probability"])
    assert "Which words decide the answer" in texts(at.markdown)


def test_aggregation_link_opens_the_inspector_and_an_unknown_point_says_so(analysed_root, run_view, monkeypatch):
    at = linked(analysed_root, monkeypatch, "aggregation", point="3")
    assert f"**Input 3** ({run_view.probe[3]['group']}" in texts(at.markdown)
    bad = linked(analysed_root, monkeypatch, "aggregation", point="99999")
    assert "`99999` is not a probe input of this run" in texts(bad.info)
    assert "Inspector" not in texts(bad.subheader)


def test_aggregation_text_search_rings_its_hits_and_lists_them(analysed_root, run_view, monkeypatch):
    word = run_view.probe[0]["text"].split()[1]
    hits = [i for i, r in enumerate(run_view.probe) if word.lower() in r["text"].lower()]
    at = app(analysed_root, monkeypatch, "aggregation")
    at.text_input(key="agg_q").set_value(word).run()
    assert sorted(at.dataframe(key="agg_rows").value["index"]) == hits
    ring = [t for t in drawn(at).data if t.name.startswith("found")]
    assert ring and sorted(int(c[3]) for c in ring[0].customdata) == hits
    assert at.query_params["q"] == word
    at.text_input(key="agg_q").set_value("zzqx-nothing").run()
    assert "No probe input of this run contains “zzqx-nothing”" in texts(at.info)


def test_aggregation_two_stages_side_by_side_share_one_slider(analysed_root, monkeypatch):
    at = linked(analysed_root, monkeypatch, "aggregation", side="stages", stages=["victim", "clean_ft/stage2"])
    assert at.select_slider(key="agg_pair").value == ("victim", "clean_ft/stage2")
    titles = [drawn(at, i).layout.title.text for i in range(2)]
    assert titles == [F.stage_title("victim"), F.stage_title("clean_ft/stage2")]
    # both panels share one projection: the same axis ranges
    assert drawn(at, 0).layout.xaxis.range == drawn(at, 1).layout.xaxis.range
    at.select_slider(key="agg_pair").set_range("stage1", "stage2").run()
    assert [drawn(at, i).layout.title.text for i in range(2)] == [F.stage_title("stage1"), F.stage_title("stage2")]
    assert at.query_params["stages"] == ["stage1", "stage2"]
    bad = linked(analysed_root, monkeypatch, "aggregation", side="stages", stages=["victim", "stage9"])
    assert "are not two stages of this run" in texts(bad.info)


def test_aggregation_two_runs_side_by_side_follow_one_stage_slider(two_preset_root, monkeypatch):
    root, micro, demo = two_preset_root
    at = linked(root, monkeypatch, "aggregation", run=micro, side="runs", other=demo)
    assert at.selectbox(key="agg_other").value == demo
    titles = [drawn(at, i).layout.title.text for i in range(2)]
    assert titles == [f"{micro}: {F.stage_title('stage1')}", f"{demo}: {F.stage_title('stage1')}"]
    at.select_slider(key="agg_stage").set_value("victim").run()
    assert [drawn(at, i).layout.title.text for i in range(2)] == [f"{micro}: victim", f"{demo}: victim"]
    assert at.query_params["other"] == demo
    at.radio(key="agg_side").set_value("one").run()
    assert "other" not in at.query_params and len(at.get("plotly_chart")) == 1


# ----------------------------------------------------------------------------------------------
# Heads


def click_head(at: AppTest, layer: int, head: int) -> AppTest:
    """What the browser sends when a cell's marker is clicked (plotly's selection, points mode)."""
    at.session_state["heads_fig"] = {"selection": {
        "points": [{"curve_number": 4, "point_index": head, "x": f"h{head}", "y": f"L{layer}",
                    "customdata": [layer, head]}], "point_indices": [head], "box": [], "lasso": []}}
    return at.run()


def test_heads_a_click_on_a_cell_picks_that_head(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "heads")
    chart = at.get("plotly_chart")[0]
    assert chart.proto.selection_mode  # the chart sends clicks back
    click_head(at, 0, 1)
    assert not at.exception, [e.value for e in at.exception]
    assert at.number_input(key="heads_layer").value == 0 and at.number_input(key="heads_head").value == 1
    one = at.dataframe[0].value
    grid = R.head_grids(run_view, "victim")["delta_asr_t1"]
    assert one.iloc[0]["ΔASR (t1)"] == pytest.approx(round(100 * grid[0, 1], 1))
    shapes = drawn(at).layout.shapes
    assert {(s.x0, s.x1) for s in shapes} == {(0.5, 1.5)}  # the picked cell is outlined
    assert at.query_params["head"] == "L0.h1"
    # the fields stay usable after a click: the same selection is not applied again
    at.number_input(key="heads_head").set_value(0).run()
    assert at.number_input(key="heads_head").value == 0


def test_heads_the_picked_head_shows_its_attention_before_and_after(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "heads")
    click_head(at, 0, 1)
    at.toggle(key="heads_attn").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    figs = [drawn(at, i) for i in range(len(at.get("plotly_chart")))]
    attn = [f for f in figs if "L0.h1" in (f.layout.title.text or "")]
    assert [f.layout.title.text for f in attn] == [f"{F.stage_title('victim')}: L0.h1", f"{F.stage_title('stage2')}: L0.h1"]
    for f in attn:
        (heat,) = f.data
        z = values(heat.z).astype(float)
        assert z.shape[0] == z.shape[1] == len(heat.x)  # query x key over the input's tokens
        np.testing.assert_allclose(np.nansum(z, axis=1), 1.0, atol=1e-4)  # each query's weights sum to 1


def test_heads_figure_prints_values_and_tables_fit(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "heads")
    at.selectbox(key="heads_quantity").set_value("delta_asr_t1").run()
    heat = [t for t in drawn(at).data if isinstance(t, go.Heatmap)]
    assert all(t.texttemplate == "%{text}" for t in heat)
    assert all(t.colorbar.orientation == "h" for t in heat if t.showscale)
    config = json.loads(at.dataframe[0].proto.columns)
    assert config["stage"]["width"] == "medium"
    assert all(config[name]["type_config"]["format"] == "%+.1f" for name in ("ΔCACC", "ΔASR (t1)"))
    top = json.loads(at.dataframe[1].proto.columns)
    assert top["ΔASR unknown (points)"]["label"] == "ΔASR unknown"  # a short header, its unit in help


def test_heads_link_restores_stages_quantity_and_head(analysed_root, monkeypatch):
    at = linked(analysed_root, monkeypatch, "heads", before="stage1", after="victim", qty="delta_cacc", head="L0.h1")
    assert at.selectbox(key="heads_before").value == "stage1" and at.selectbox(key="heads_after").value == "victim"
    assert at.selectbox(key="heads_quantity").value == "delta_cacc"
    assert at.number_input(key="heads_head").value == 1 and not at.info
    bad = linked(analysed_root, monkeypatch, "heads", before="nope", head="L9.h9")
    notes = texts(bad.info)
    assert "stage `nope`" in notes and "head `L9.h9` is not a head of this model" in notes
    assert bad.selectbox(key="heads_before").value == "victim" and bad.number_input(key="heads_head").value == 0


# ----------------------------------------------------------------------------------------------
# Compare


@pytest.fixture(scope="module")
def two_preset_root(run_view, tmp_path_factory):
    """The micro run and a copy of it relabelled as another preset."""
    root = tmp_path_factory.mktemp("two_presets")
    shutil.copytree(run_view.path, root / run_view.run_id)
    other = root / "20000101-000000-demo-copy"
    shutil.copytree(run_view.path, other)
    state = json.loads((other / "state.json").read_text())
    state["preset"] = "demo"
    (other / "state.json").write_text(json.dumps(state))
    return root, run_view.run_id, other.name


def test_compare_a_run_of_another_preset_added_later_is_shown(two_preset_root, monkeypatch):
    root, micro, demo = two_preset_root
    at = linked(root, monkeypatch, "compare", run=micro)
    assert at.multiselect(key="cmp_presets").value == ["micro"]
    at.multiselect(key="cmp_runs").set_value([micro, demo]).run()
    assert at.multiselect(key="cmp_presets").value == ["micro", "demo"]
    assert set(at.dataframe[0].value["run"]) == {micro, demo}
    # an option the user took out stays out
    at.multiselect(key="cmp_presets").set_value(["demo"]).run()
    at.multiselect(key="cmp_rows").set_value(["victim"]).run()
    assert list(at.dataframe[0].value["run"]) == [demo]


def test_compare_an_empty_filter_says_what_to_choose(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "compare")
    at.multiselect(key="cmp_presets").set_value([]).run()
    assert "Choose at least one preset" in texts(at.info)
    at.multiselect(key="cmp_runs").set_value([]).run()
    assert "Choose at least one run" in texts(at.info)


def test_compare_method_column_names_each_rows_own_method(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "compare")
    table = at.dataframe[0].value
    method = dict(zip(table["row"], table["method"]))
    run_method = run_view.config["defense"]["method"]
    assert method["victim"] == "none (victim)"
    assert method["Locphylax Stage 1"] == run_method and method["Locphylax Stage 2"] == run_method
    for name in run_view.summary["baselines"]:
        assert method[DEFENSES.label(name)] == DEFENSES.label(name)


def test_compare_bars_print_their_values(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "compare")
    at.selectbox(key="cmp_metric").set_value("ASR t1 %").run()
    bars = drawn(at).data
    assert bars and all(b.texttemplate == "%{y:.1f}" and b.textposition == "outside" for b in bars)


def test_compare_link_restores_runs_filters_and_metric(two_preset_root, monkeypatch):
    root, micro, demo = two_preset_root
    at = linked(root, monkeypatch, "compare", runs=[micro, demo], rows=["victim", "clean fine-tuning"],
                presets=["demo"], metric="CACC %")
    assert at.multiselect(key="cmp_runs").value == [micro, demo]
    assert at.multiselect(key="cmp_presets").value == ["demo"] and at.selectbox(key="cmp_metric").value == "CACC %"
    table = at.dataframe[0].value
    assert list(table["run"]) == [demo, demo] and list(table["row"]) == ["victim", "clean fine-tuning"]
    bad = linked(root, monkeypatch, "compare", runs=["no-such-run"], metric="bogus %")
    notes = texts(bad.info)
    assert "`no-such-run`" in notes and "bar metric `bogus %`" in notes
    assert bad.selectbox(key="cmp_metric").value == "ASR unknown %"


# ----------------------------------------------------------------------------------------------
# CASD and Export


def test_casd_page_shows_the_matrix_its_meaning_and_a_csv(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "casd")
    casd = run_view.analysis["casd"]
    (heat,) = drawn(at).data
    assert isinstance(heat, go.Heatmap) and values(heat.z).shape == (len(casd["labels"]),) * 2
    assert "Locphylax Stage 2" in heat.x and DEFENSES.label("clean_ft") in heat.x
    assert "cross activation shift distance" in texts(at.markdown)
    assert [b.proto.label for b in at.get("download_button")] == ["casd.csv"]
    at.multiselect(key="casd_show").set_value(["stage2", "clean_ft"]).run()
    z = values(drawn(at).data[0].z)
    i, j = casd["labels"].index("stage2"), casd["labels"].index("clean_ft")
    assert z[0][1] == pytest.approx(casd["matrix"][i][j])
    assert at.query_params["show"] == ["stage2", "clean_ft"]
    again = linked(analysed_root, monkeypatch, "casd", **dict(at.query_params))
    assert again.multiselect(key="casd_show").value == ["stage2", "clean_ft"]
    bad = linked(analysed_root, monkeypatch, "casd", show=["nothing"])
    assert "`nothing`" in texts(bad.info) and len(bad.multiselect(key="casd_show").value) == len(casd["labels"])


@pytest.mark.parametrize("complete", [True, False])
def test_casd_page_without_casd_says_why(run_view, tmp_path, monkeypatch, complete):
    dst = tmp_path / run_view.run_id
    shutil.copytree(run_view.path, dst, ignore=shutil.ignore_patterns("checkpoints", "hidden"))
    analysis = json.loads((dst / "analysis.json").read_text())
    analysis["casd"], analysis["complete"] = None, complete  # False: the analysis is still running
    (dst / "analysis.json").write_text(json.dumps(analysis))
    at = app(tmp_path, monkeypatch, "casd")
    assert ("has no CASD" if complete else "still being computed") in texts(at.info)
    assert not at.get("plotly_chart")


def test_export_page_offers_the_casd_csv(analysed_root, monkeypatch):
    at = app(analysed_root, monkeypatch, "export")
    assert "casd.csv" in {b.proto.label for b in at.get("download_button")}


@pytest.mark.parametrize("page", ["aggregation", "heads", "compare", "casd"])
def test_damaged_run_folders_never_crash_these_pages(run_view, tmp_path, monkeypatch, page):
    corrupt = tmp_path / "20990101-000000-micro-corrupt"
    shutil.copytree(run_view.path, corrupt, ignore=shutil.ignore_patterns("checkpoints"))
    (corrupt / "analysis.json").write_text("{ not json")
    at = linked(tmp_path, monkeypatch, page, run=corrupt.name, stage="x", head="L0")
    if page != "compare":
        assert "analysis.json is corrupt" in texts(at.error)


# ----------------------------------------------------------------------------------------------
# Layers


def test_layers_page_draws_lens_and_patching_maps_for_two_stages(analysed_root, run_view, monkeypatch):
    at = app(analysed_root, monkeypatch, "layers")
    stages = R.layer_stages(run_view)
    assert at.selectbox(key="layers_before").value == "victim"
    assert at.selectbox(key="layers_after").value == "stage2"
    charts = [drawn(at, i) for i in range(len(at.get("plotly_chart")))]
    assert len(charts) == 3  # lens, residual map, head map
    resid = R.layer_maps(run_view, "stage2")["residual"]
    z = values(charts[1].data[1].z).astype(float)  # the "after" panel
    np.testing.assert_allclose(z, resid, atol=1e-9)
    diff = values(charts[1].data[2].z).astype(float)
    np.testing.assert_allclose(diff, resid - R.layer_maps(run_view, "victim")["residual"], atol=1e-9)
    assert [b.proto.label for b in at.get("download_button")] == ["patching.csv"]
    other = [s for s in stages if "/" in s][0]  # a baseline
    at.selectbox(key="layers_after").set_value(other).run()
    assert not at.exception
    again = linked(analysed_root, monkeypatch, "layers", **dict(at.query_params))
    assert again.selectbox(key="layers_after").value == other
    assert "defender's detector" in texts(at.markdown)


def test_layers_page_without_layer_analyses_says_why(run_view, tmp_path, monkeypatch):
    dst = tmp_path / run_view.run_id
    shutil.copytree(run_view.path, dst)
    analysis = json.loads((dst / "analysis.json").read_text())
    analysis["patching"], analysis["logit_lens"] = {}, {}
    (dst / "analysis.json").write_text(json.dumps(analysis))
    at = app(tmp_path, monkeypatch, "layers")
    assert "no layer analyses" in texts(at.info) and "--all" not in texts(at.info)
    assert not at.get("plotly_chart")
    # a run whose config leaves them out (the live preset) says so and how to compute them
    import yaml
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["eval"]["analyses"] = ["heads"]
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    analysis["casd"] = None
    (dst / "analysis.json").write_text(json.dumps(analysis))
    for page in ("layers", "casd"):
        at = app(tmp_path, monkeypatch, page)
        assert f"`locphylax analyze {run_view.run_id} --all` computes" in texts(at.info), page
