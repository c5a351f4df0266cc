"""The scale benchmark's machinery (bench/scale_bench.py) on its tiny CPU smoke model: one row per
stage with steps, seconds and throughput, and a failing mode reported instead of lost."""

from __future__ import annotations

import csv

from bench import scale_bench


def test_tiny_scale_bench_writes_a_row_per_stage_and_reports_a_failing_mode(tmp_path):
    mod = scale_bench
    assert mod.main(["--tiny", "--device", "cpu", "--modes", "fp32", "qlora", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "scale.csv").open()))
    assert [r["stage"] for r in rows] == ["clean", "victim", "stage1", "stage2"]
    assert [int(r["steps"]) for r in rows] == [60, 30, 30, 30]
    assert all(float(r["seconds"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    md = (tmp_path / "scale.md").read_text()
    assert "tiny smoke model" in md
    # 4-bit needs a GPU: the mode fails with the configuration's message, and the fp32 rows stay
    assert "| qlora | – | ConfigError" in md and "model.quantization" in md
