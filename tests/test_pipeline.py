"""The whole pipeline on the micro preset: the files of a run folder and determinism."""

from __future__ import annotations

import json
import math

import torch
import yaml

from conftest import load_tensors, numbers, read_jsonl
from locphylax_core import load_config, start_run
from locphylax_core.config import RunConfig
from locphylax_core.pipeline import stage_specs

STAGE_KEYS = ["clean", "victim", "stage1", "stage2", "clean_ft/stage1", "clean_ft/stage2",
              "unlearn_single/stage1", "unlearn_single/stage2", "no_cluster/stage1", "no_cluster/stage2"]
TRIGGERS = {"unknown", "t1", "t2"}


def _rate(x, allow_none=False):
    if x is None:
        return allow_none
    return isinstance(x, (int, float)) and 0.0 <= x <= 1.0


def _check_block(block):
    assert set(block) == {"cacc", "asr", "asr_raw"}
    assert _rate(block["cacc"])
    assert set(block["asr"]) == TRIGGERS and set(block["asr_raw"]) == TRIGGERS
    for k in TRIGGERS:
        # headline ASR is None when no non-target input is answered correctly without the trigger
        assert _rate(block["asr"][k], allow_none=True)
        assert _rate(block["asr_raw"][k])


def test_summary_schema(micro_run):
    s = json.loads((micro_run.path / "summary.json").read_text())
    assert s == micro_run.summary
    assert s["schema"] == 1
    assert s["run_id"] == micro_run.path.name
    assert s["preset"] == "micro"
    assert s["status"] == "done"
    assert set(s["stages"]) == {"victim", "stage1", "stage2"}
    assert set(s["baselines"]) == {"clean_ft", "unlearn_single", "no_cluster"}
    for block in [*s["stages"].values(), *s["baselines"].values()]:
        _check_block(block)
    secs = s["seconds"]
    assert {"victim", "stage1", "stage2", "total"} <= set(secs)
    assert all(isinstance(v, (int, float)) and v >= 0 for v in secs.values())
    assert secs["total"] >= secs["victim"] + secs["stage1"] + secs["stage2"] - 0.05
    assert s["n_test"] == 60
    assert s["triggers"]["t1"] == "vx" and s["triggers"]["t2"] == "as seen on channel four"
    assert "cf" not in json.dumps(s["triggers"])  # the attacker's trigger is not in the summary
    # alpha comes from the log10 rule: a power of ten
    assert s["alpha"] > 0 and math.log10(s["alpha"]) == round(math.log10(s["alpha"]))


def test_summary_matches_state_and_final_metrics(micro_run):
    state = micro_run.run.read_state()
    assert state["status"] == "done"
    assert state["finished"] == STAGE_KEYS
    rows = [r for r in read_jsonl(micro_run.path / "metrics.jsonl") if r["split"] == "test"]
    by_key = {r["key"]: r for r in rows}
    assert len(rows) == len(by_key) == len(STAGE_KEYS)  # one final evaluation per stage
    s = micro_run.summary
    for key, block in [("victim", s["stages"]["victim"]), ("stage1", s["stages"]["stage1"]),
                       ("stage2", s["stages"]["stage2"]),
                       *[(f"{m}/stage2", b) for m, b in s["baselines"].items()]]:
        assert block["cacc"] == by_key[key]["cacc"] == state["results"][key]["cacc"]
        assert block["asr"] == by_key[key]["asr"]
        assert block["asr_raw"] == by_key[key]["asr_raw"]
    assert s["clean_model"]["cacc"] == by_key["clean"]["cacc"]


def test_config_yaml(micro_run):
    data = yaml.safe_load((micro_run.path / "config.yaml").read_text())
    assert RunConfig.model_validate(data) == micro_run.cfg == load_config("micro")


def test_metrics_rows(micro_run):
    rows = read_jsonl(micro_run.path / "metrics.jsonl")
    assert {r["split"] for r in rows} == {"curve", "test"}
    for r in rows:
        assert {"key", "stage", "method", "step", "split", "cacc", "asr", "asr_raw"} <= set(r)
        assert r["key"] in STAGE_KEYS
        assert _rate(r["cacc"])
        assert set(r["asr"]) == TRIGGERS
    specs = {s.key: s for s in stage_specs(micro_run.cfg)}
    for r in rows:
        assert (r["method"], r["stage"]) == (specs[r["key"]].method, specs[r["key"]].stage)
    # curves: every eval.every (3) steps and at the last step, for every stage; the clean model
    # (trained from scratch) every eval.clean_every (5) steps
    cfg = micro_run.cfg
    expected_steps = {"clean": [5, 10, 15], "victim": [3, 6, 9, 10], "stage1": [3, 6], "stage2": [3, 6]}
    for key, steps in expected_steps.items():
        got = [r["step"] for r in rows if r["key"] == key and r["split"] == "curve"]
        assert got == steps, key
    assert cfg.train.clean_steps == 15 and cfg.attack.steps == 10
    # Stage 1 curve rows carry the training losses, including the clustering term and alpha.
    s1 = [r for r in rows if r["key"] == "stage1" and r["split"] == "curve"]
    assert all({"l_inj", "l_cluster", "alpha"} <= set(r) for r in s1)
    assert all(r["alpha"] == micro_run.summary["alpha"] for r in s1)
    nc = [r for r in rows if r["key"] == "no_cluster/stage1" and r["split"] == "curve"]
    assert nc and all("l_cluster" not in r for r in nc)
    # the curve set is a subset of the test set (eval.curve_examples = 20 of 60)
    assert micro_run.cfg.eval.curve_examples == 20


def test_checkpoints(micro_run):
    shapes = None
    for key in STAGE_KEYS:
        folder = micro_run.run.checkpoint(key)
        assert (folder / "model.safetensors").is_file(), key
        assert (folder / "config.json").is_file()
        tensors = load_tensors(folder / "model.safetensors")
        cur = {k: tuple(v.shape) for k, v in tensors.items()}
        shapes = shapes or cur
        assert cur == shapes
        assert not list(folder.glob("*.bin"))
    assert shapes["transformer.wte.weight"][1] == 32
    assert (micro_run.path / "checkpoints" / "stage1").is_dir()
    assert (micro_run.path / "checkpoints" / "no_cluster__stage2").is_dir()
    # training changed the weights from stage to stage
    v = load_tensors(micro_run.run.checkpoint("victim") / "model.safetensors")
    s1 = load_tensors(micro_run.run.checkpoint("stage1") / "model.safetensors")
    assert not torch.equal(v["transformer.h.0.mlp.c_fc.weight"], s1["transformer.h.0.mlp.c_fc.weight"])


def test_hidden_states_and_probe(micro_run):
    probe = read_jsonl(micro_run.path / "probe.jsonl")
    groups = [r["group"] for r in probe]
    assert {"clean:negative", "clean:positive", "unknown", "known:t1", "known:t2"} == set(groups)
    assert all(groups.count(g) <= micro_run.cfg.eval.probe_per_group for g in set(groups))
    assert all({"text", "group", "label"} <= set(r) for r in probe)
    assert all(r["label"] == 0 for r in probe if r["group"] == "unknown")  # non-target inputs only
    n = len(probe)
    assert n == 20
    for key in STAGE_KEYS:
        t = load_tensors(micro_run.run.hidden(key))
        assert set(t) == {"last_block", "final_norm", "pred"}
        assert tuple(t["last_block"].shape) == (n, 32)
        assert tuple(t["final_norm"].shape) == (n, 32)
        assert tuple(t["pred"].shape) == (n,)
        assert set(t["pred"].tolist()) <= {0, 1}
        assert torch.isfinite(t["last_block"]).all() and torch.isfinite(t["final_norm"]).all()
    # final_norm is LayerNorm(last_block) of the same model
    ck = load_tensors(micro_run.run.checkpoint("stage2") / "model.safetensors")
    t = load_tensors(micro_run.run.hidden("stage2"))
    ln = torch.nn.functional.layer_norm(t["last_block"], (32,), ck["transformer.ln_f.weight"],
                                        ck["transformer.ln_f.bias"], 1e-5)
    assert torch.allclose(ln, t["final_norm"], atol=1e-4)


def test_progress_and_tokenizer(micro_run):
    prog = json.loads((micro_run.path / "progress.json").read_text())
    assert prog["status"] == "done"
    assert (micro_run.path / "tokenizer" / "tokenizer.json").is_file()
    assert not list((micro_run.path / "tokenizer").glob("*.bin"))
    assert not (micro_run.path / "CANCEL").exists()


def test_fixed_seed_gives_identical_runs(micro_run, tmp_path):
    run2, summary2 = start_run(load_config("micro"), runs_root=tmp_path / "runs")
    assert run2.path != micro_run.path
    assert numbers(summary2) == numbers(micro_run.summary)
    # bit-identical weights and hidden states, not only equal rounded metrics
    for key in ("victim", "stage2", "no_cluster/stage2"):
        a = load_tensors(micro_run.run.checkpoint(key) / "model.safetensors")
        b = load_tensors(run2.checkpoint(key) / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
        ha, hb = load_tensors(micro_run.run.hidden(key)), load_tensors(run2.hidden(key))
        assert all(torch.equal(ha[k], hb[k]) for k in ha)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds",)} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run2.path / "metrics.jsonl")) == strip(read_jsonl(micro_run.path / "metrics.jsonl"))


def test_other_seed_gives_other_weights(micro_run, tmp_path):
    from locphylax_core.experiment import stage_seed
    assert stage_seed(0, "victim") != stage_seed(1, "victim") != stage_seed(0, "stage1")
    cfg = load_config("micro", ["seed=1", "defense.baselines=[]", "defense.stage1_steps=1",
                                "defense.stage2_steps=1"])
    run, _ = start_run(cfg, runs_root=tmp_path / "runs")
    a = load_tensors(micro_run.run.checkpoint("victim") / "model.safetensors")
    b = load_tensors(run.checkpoint("victim") / "model.safetensors")
    assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])


def test_the_last_curve_point_is_the_final_model_on_the_curve_set(micro_run):
    """A stage's curve ends with its final model (read off the final evaluation of the test set)."""
    from locphylax_core import model as M
    from locphylax_core.evaluation import evaluate
    from locphylax_core.experiment import as_lm, prepare
    rows = read_jsonl(micro_run.path / "metrics.jsonl")
    p = prepare(micro_run.cfg)
    for key in ("victim", "stage2"):
        last = [r for r in rows if r["key"] == key and r["split"] == "curve"][-1]
        lm = as_lm(p, M.load_checkpoint(micro_run.run.checkpoint(key)), torch.device("cpu"))
        r = evaluate(lm, p.task.template, p.curve_set, micro_run.cfg.eval.batch_size, p.max_length)
        assert {k: last[k] for k in ("cacc", "asr", "asr_raw")} == r, key
