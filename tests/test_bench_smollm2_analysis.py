"""bench/smollm2_analysis.py on two copies of the micro run: the t-SNE panels, the aggregation table
and a head sweep of chosen blocks with its measured cost, written where the script says."""

from __future__ import annotations

import shutil

import numpy as np

from bench import smollm2_analysis


def test_the_real_lm_analysis_writes_the_table_and_both_figures(micro_run, tmp_path, monkeypatch):
    mod = smollm2_analysis
    runs = []
    for name in ("real", "tiny"):
        dst = tmp_path / "runs" / name
        shutil.copytree(micro_run.path, dst)
        runs.append(dst)
    monkeypatch.setattr(mod, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(mod, "OUT", tmp_path / "results")
    monkeypatch.setattr(mod, "screenshot", lambda fig, png: False)  # no Chromium needed here
    (tmp_path / "figures").mkdir()
    (tmp_path / "results").mkdir()
    sweeps = []
    real_sweep = mod.sweep
    monkeypatch.setattr(mod, "sweep", lambda run, n, layers: sweeps.append(r := real_sweep(run, n, layers)) or r)
    assert mod.main(["--real", str(runs[0]), "--tiny", str(runs[1]), "--probe", "8", "--blocks", "1"]) == 0
    text = (tmp_path / "results" / "smollm2_analysis.md").read_text()
    assert "| SmolLM2-135M-Instruct | `real` |" in text and "| small (tiny) | `tiny` |" in text
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"tsne_smollm2_vs_small_sst2.html",
                                                                   "heads_smollm2_sst2.html"}
    real, tiny = sweeps
    n_layers, n_heads = micro_run.cfg.model.n_layer, micro_run.cfg.model.n_head
    assert real["swept_heads"] == n_heads and tiny["swept_heads"] == n_layers * n_heads
    assert real["res"]["victim"]["layers"] == [n_layers - 1]
    # the last block's rows are the full sweep's; the blocks before it were not swept
    for key in ("victim", "stage2"):
        got, want = real["res"][key]["delta_cacc"], tiny["res"][key]["delta_cacc"]
        np.testing.assert_array_equal(got[-1], want[-1])
        assert np.isnan(got[:-1]).all()
    assert real["per_head"] > 0 and f"| {n_heads} of {n_layers * n_heads} |" in text
