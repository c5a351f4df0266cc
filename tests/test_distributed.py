"""Gradient accumulation, bf16, gradient checkpointing and data parallelism (docs/scale.md).

- With ``train.grad_accum = k`` the Stage 1 gradient equals the full-batch one: the clustering loss
  (centroids) is computed on the union of the micro-batches (engine.SplitLoss); naive per-micro-batch
  centroids are biased, shown here too.
- Two gloo processes with the gathered (global-batch) centroids give the single-process loss and
  gradient on the union batch.
- ``accelerate launch`` with configs/accelerate/cpu_ddp.yaml (and fsdp.yaml) runs `locphylax run
  micro` on two CPU processes: one run folder, and the summary metrics of one process.

Tolerance (also in docs/scale.md): the two runs differ only by floating-point reduction order, so
exact equality is not promised. Asserted: every CACC / ASR / raw ASR within METRIC_TOL = 0.05
absolute (one input of a 20-input ASR denominator; the micro test set has 60 inputs), every weight
within WEIGHT_TOL = 5e-4 absolute, every curve loss within 1e-4 relative. Measured on the
development machine (2 CPU cores): all metrics exactly equal, weights within 1.1e-4, losses within
2e-7 relative.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, cli_env, load_tensors, read_jsonl
from locphylax_core import distributed as DI
from locphylax_core import engine as E
from locphylax_core import trainer as T
from locphylax_core.defenses import locphylax as D
from locphylax_core.architectures import decoder_blocks
from locphylax_core import load_config
from locphylax_core.errors import ConfigError


METRIC_TOL = 0.05
WEIGHT_TOL = 5e-4

# ----------------------------------------------------------------------------------------------
# helpers


def _rates(summary: dict, stages=None) -> dict:
    """Every CACC / ASR / raw ASR of a summary, by (row, metric, trigger)."""
    out = {}
    rows = {**{k: v for k, v in summary["stages"].items() if stages is None or k in stages},
            **({} if stages is not None else summary["baselines"])}
    for name, block in rows.items():
        out[(name, "cacc", "")] = block["cacc"]
        for metric in ("asr", "asr_raw"):
            for trig, v in block[metric].items():
                out[(name, metric, trig)] = v
    return out


def _assert_metrics_close(a: dict, b: dict, stages=None) -> None:
    ra, rb = _rates(a, stages), _rates(b, stages)
    assert ra.keys() == rb.keys()
    for k in ra:
        if ra[k] is None or rb[k] is None:
            assert ra[k] is rb[k], k
        else:
            assert abs(ra[k] - rb[k]) <= METRIC_TOL, (k, ra[k], rb[k])
    assert a["alpha"] == b["alpha"]


def _stage_loss(monkeypatch, lm, prep, fn, cfg, batch_size=32):
    """The step loss and one batch that ``fn`` (inject / recover) would train on."""
    got = {}

    def fake_loop(model, data, steps, settings, step_loss, *rest):
        got["data"], got["step_loss"] = data, step_loss
        return {}

    with monkeypatch.context() as m:  # only for this call: the test may train with trainer.fit afterwards
        m.setattr(T, "_loop", fake_loop)
        fn(lm, prep.defender, cfg,
           T.StageContext(seed=0, settings=T.TrainSettings(batch_size=batch_size, max_length=prep.max_length)))
    return got["step_loss"], next(got["data"])


def _grads(model) -> torch.Tensor:
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _full_batch(model, step_loss, batch):
    loss, logs = step_loss(model, batch, 1)
    loss.backward()
    return _grads(model), logs


# ----------------------------------------------------------------------------------------------
# gradient accumulation


@pytest.mark.parametrize("centroid", ["batch", "running"])
def test_accumulated_stage1_gradient_equals_full_batch(monkeypatch, tiny_lm, micro_prepared, centroid):
    """grad_accum = 2 and 4 give the full-batch Stage 1 gradient and loss (relative error < 1e-5);
    per-micro-batch centroids (the naive way) are off by more than 1e-3."""
    cfg = D.InjectConfig(steps=1, alpha=1.0, injection_rate=0.4, centroid=centroid, centroid_momentum=0.5)
    model = tiny_lm.model.train()
    ref_loss, batch = _stage_loss(monkeypatch, tiny_lm, micro_prepared, D.inject, cfg)
    assert set(batch.groups.tolist()) == {-1, 0, 1}
    g_full, logs_full = _full_batch(model, ref_loss, batch)
    for k in (2, 4):
        step_loss, _ = _stage_loss(monkeypatch, tiny_lm, micro_prepared, D.inject, cfg)  # fresh running state
        logs = DI.accumulate_step(model, batch, 1, step_loss, k)
        g = _grads(model)
        assert _rel(g, g_full) < 1e-5, (k, _rel(g, g_full))
        assert logs["l_cluster"] == pytest.approx(logs_full["l_cluster"], rel=1e-6)
        assert logs["l_inj"] == pytest.approx(logs_full["l_inj"], rel=1e-6)
        # naive: each micro-batch its own centroids (and its own running update)
        step_loss, _ = _stage_loss(monkeypatch, tiny_lm, micro_prepared, D.inject, cfg)
        naive_logs = DI.accumulate_step(model, batch, 1, lambda m, b, s: step_loss(m, b, s), k)
        g_naive = _grads(model)
        assert _rel(g_naive, g_full) > 1e-3, (k, _rel(g_naive, g_full))
        assert abs(naive_logs["l_cluster"] - logs_full["l_cluster"]) > 1e-4 * logs_full["l_cluster"]


def test_accumulated_consistency_and_lm_losses_are_exact(monkeypatch, tiny_lm, micro_prepared):
    """The Stage 2 consistency term and the token-averaged LM loss (training from scratch) are not
    means over rows either; with SplitLoss they too match the full batch."""
    model = tiny_lm.model.train()
    cfg = D.RecoverConfig(steps=1, consistency_weight=5.0, injection_rate=0.4)
    step_loss, batch = _stage_loss(monkeypatch, tiny_lm, micro_prepared, D.recover, cfg)
    g_full, logs_full = _full_batch(model, step_loss, batch)
    logs = DI.accumulate_step(model, batch, 1, step_loss, 4)
    assert _rel(_grads(model), g_full) < 1e-5
    assert logs["l_consistency"] == pytest.approx(logs_full["l_consistency"], rel=1e-5)
    lm_step = E.answer_and_lm_loss(0.5)
    g_full, logs_full = _full_batch(model, lm_step, batch)
    logs = DI.accumulate_step(model, batch, 1, lm_step, 3)
    assert _rel(_grads(model), g_full) < 1e-5
    assert logs["l_lm"] == pytest.approx(logs_full["l_lm"], rel=1e-5)


def test_grad_accum_run_matches_plain_run(micro_prepared):
    """A whole Stage 1 with train.grad_accum=4 ends at the weights of the plain loop (to float
    precision): the effective batch and the loss are the same."""
    from locphylax_core import model as M
    prep = micro_prepared
    weights = []
    for k in (1, 4):
        cfg = load_config("micro", [f"train.grad_accum={k}"])
        lm = M.LM(M.build_embedded(cfg.model, prep.tokenizer, seed=0), prep.tokenizer, prep.answer_ids)
        settings = T.TrainSettings.for_defense(cfg, prep.max_length)
        assert settings.grad_accum == k
        out = D.inject(lm, prep.defender, D.InjectConfig(steps=4, alpha=1.0), T.StageContext(seed=0, settings=settings))
        assert out["l_cluster"] > 0
        weights.append(torch.cat([p.detach().reshape(-1) for p in lm.model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-4), (weights[0] - weights[1]).abs().max()


def test_grad_accum_validation():
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config("micro", ["train.grad_accum=32"])  # more micro-batches than rows (batch 16)
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config("micro", ["train.grad_accum=0"])
    cfg = load_config("micro")
    assert (cfg.train.grad_accum, cfg.train.bf16, cfg.train.grad_checkpointing) == (1, False, False)


# ----------------------------------------------------------------------------------------------
# gradient checkpointing and bf16


def test_grad_checkpointing_keeps_the_cluster_gradient(monkeypatch, tiny_lm, micro_prepared):
    """Checkpointing is non-reentrant, so the hooked block output keeps its gradient: the Stage 1
    gradient (clustering term included) equals the one without checkpointing."""
    cfg = D.InjectConfig(steps=1, alpha=1.0, injection_rate=0.4)
    model = tiny_lm.model.train()
    step_loss, batch = _stage_loss(monkeypatch, tiny_lm, micro_prepared, D.inject, cfg)
    block = decoder_blocks(model)[-1]
    calls = []
    handle = block.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        g_plain, _ = _full_batch(model, step_loss, batch)
        assert len(calls) == 1
        T.set_checkpointing(model, True)
        try:
            model.train()
            g_ckpt, _ = _full_batch(model, step_loss, batch)
            assert len(calls) == 3  # the block's MLP ran again during backward: it was checkpointed
            logs = DI.accumulate_step(model, batch, 1, step_loss, 2)
            g_ckpt_acc = _grads(model)
        finally:
            T.set_checkpointing(model, False)
    finally:
        handle.remove()
    assert _rel(g_ckpt, g_plain) < 1e-6
    assert _rel(g_ckpt_acc, g_plain) < 1e-5 and logs["l_cluster"] > 0
    # and fit switches it on for the stage only
    it = iter([batch, batch])
    T.fit(SimpleNamespace(model=model), it, 2,
          T.StageContext(settings=T.TrainSettings(lr=1e-3, grad_checkpointing=True)), step_loss=step_loss)
    assert not model.is_activation_checkpointing


def test_bf16_autocast_keeps_float32_losses(monkeypatch, tiny_lm, micro_prepared):
    cfg = D.InjectConfig(steps=1, alpha=1.0, injection_rate=0.4)
    model = tiny_lm.model.train()
    step_loss, batch = _stage_loss(monkeypatch, tiny_lm, micro_prepared, D.inject, cfg)
    g32, logs32 = _full_batch(model, step_loss, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs16 = step_loss(model, batch, 1)
    assert loss.dtype == torch.float32
    loss.backward()
    g16 = _grads(model)
    assert _rel(g16, g32) < 0.1  # bfloat16 has 8 bits of mantissa
    assert logs16["l_inj"] == pytest.approx(logs32["l_inj"], rel=0.05)
    out = T.fit(SimpleNamespace(model=model), iter([batch] * 3), 3,
                T.StageContext(settings=T.TrainSettings(lr=1e-3, bf16=True, grad_accum=2)), step_loss=step_loss)
    assert all(torch.isfinite(p).all() for p in model.parameters()) and out["loss"] > 0


# ----------------------------------------------------------------------------------------------
# two processes (gloo): the gathered-centroid loss equals the single-process loss on the union


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_problem():
    """A 1-block GPT-2, a left-padded batch of 12 rows (4 clean, 4 + 4 carrying triggers 0 and 1)
    and an inject-like step loss (answer CE + clustering of the last block's last-token state)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(conf).train()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(4, 10, (12,), generator=g)
    ids = torch.randint(1, 40, (12, 10), generator=g)
    mask = (torch.arange(10)[None, :] >= 10 - lengths[:, None]).long()
    ids = ids * mask
    batch = E.Batch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), targets=torch.randint(0, 40, (12,), generator=g),
                    groups=torch.tensor([-1, 0, 1, 0, -1, 1, 1, 0, -1, 0, 1, -1]))
    hidden = E.HiddenSpec(-1, False, "last")

    def step_loss(m, b, _step):
        logits, h = E.forward_answer(m, b, hidden)
        l_inj = torch.nn.functional.cross_entropy(logits.float(), b.targets)
        l_cl = D.cluster_loss(h.float(), b.groups)
        loss = l_inj + 0.5 * l_cl
        return loss, {"loss": loss.item(), "l_inj": l_inj.item(), "l_cluster": l_cl.item()}

    def rows(m, b):
        logits, h = E.forward_answer(m, b, hidden)
        return torch.nn.functional.cross_entropy(logits.float(), b.targets), h.float(), None

    def term(h, _c, groups, l_inj, _step):
        l_cl = D.cluster_loss(h, groups)
        return 0.5 * l_cl, {"loss": l_inj + 0.5 * l_cl.item(), "l_inj": l_inj, "l_cluster": l_cl.item()}

    step_loss.split = E.SplitLoss(rows, term)
    return model, batch, step_loss


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = DI.DistContext(rank, world, torch.device("cpu"))
        model, batch, step_loss = _tiny_problem()
        params = [p for p in model.parameters()]
        res = {}
        for name, fn, k in (("gathered", step_loss, 1), ("gathered_accum", step_loss, 2),
                            ("per_rank", lambda m, b, s: step_loss(m, b, s), 1)):
            logs = DI.accumulate_step(model, batch, 1, fn, k, ctx)
            ctx.sum_grads(params)
            res[name] = (logs, _grads(model))
        ctx.barrier()
        if rank == 0:
            torch.save(res, out)
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_cluster_loss_on_two_ranks_equals_union_batch(tmp_path):
    out = tmp_path / "ranks.pt"
    # fork: the children inherit the imports (spawn would re-import torch and transformers: +20 s)
    torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), str(out)), nprocs=2, join=True,
                                          start_method="fork")
    res = torch.load(out)
    model, batch, step_loss = _tiny_problem()
    g_full, logs_full = _full_batch(model, step_loss, batch)
    for name in ("gathered", "gathered_accum"):
        logs, g = res[name]
        assert _rel(g, g_full) < 1e-5, (name, _rel(g, g_full))
        assert logs["l_cluster"] == pytest.approx(logs_full["l_cluster"], rel=1e-6)
        assert logs["loss"] == pytest.approx(logs_full["loss"], rel=1e-6)
    logs, g = res["per_rank"]  # each rank its own centroids: a different loss and gradient
    assert _rel(g, g_full) > 1e-3
    assert abs(logs["l_cluster"] - logs_full["l_cluster"]) > 1e-3 * logs_full["l_cluster"]


# ----------------------------------------------------------------------------------------------
# accelerate launch: `locphylax run micro` on two CPU processes


def _launch_env() -> dict:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch_cmd(args: list[str], config: str = "cpu_ddp") -> list[str]:
    exe = REPO / ".venv" / "bin" / "accelerate"
    return [str(exe) if exe.exists() else "accelerate", "launch", "--config_file",
            str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--main_process_port", str(_free_port()),
            "-m", "locphylax_core.cli", *args]


def test_accelerate_launch_matches_single_process(micro_run, tmp_path):
    """`locphylax run micro` on two processes, cancelled by a CANCEL file after the victim (both ranks
    stop at the same step; the run stays resumable) and resumed by `accelerate launch ... resume`:
    one run folder, the single-process run's summary metrics (METRIC_TOL), weights (WEIGHT_TOL)."""
    root = tmp_path / "runs"
    t0 = time.perf_counter()
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(_launch_cmd(["--runs", str(root), "run", "micro", "--no-analyze"]), cwd=REPO,
                            env=_launch_env(), stdout=log, stderr=subprocess.STDOUT)
    folders = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            folders = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
            st = None
            if folders:
                try:
                    st = json.loads((folders[0] / "state.json").read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    pass
            if st is not None and "victim" in st.get("finished", []):
                (folders[0] / "CANCEL").touch()
                break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert len(folders) == 1, text[-3000:]  # only rank 0 writes a run folder
    run = folders[0]
    state = json.loads((run / "state.json").read_text())
    if state["status"] != "done":  # the CANCEL file was seen (the usual case)
        # each rank exits with 130; torchrun reports that as a failed launch (exit status 1)
        assert proc.returncode != 0 and state["status"] == "cancelled", (state["status"], text[-3000:])
        assert "stopped: cancelled at step" in text
        assert not (run / "CANCEL").exists()
        assert "victim" in state["finished"] and "stage2" not in state["finished"]
        with (tmp_path / "resume.log").open("w") as log:
            res = subprocess.run(_launch_cmd(["--runs", str(root), "resume", run.name, "--no-analyze"]), cwd=REPO,
                                 env=_launch_env(), stdout=log, stderr=subprocess.STDOUT, timeout=240)
        assert res.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert len([d for d in root.iterdir() if d.is_dir()]) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done"
    _assert_metrics_close(summary, micro_run.summary)  # CACC / ASR of every stage and baseline
    for key in ("victim", "stage1", "stage2", "no_cluster/stage2"):
        a = load_tensors(micro_run.run.checkpoint(key) / "model.safetensors")
        b = load_tensors(run / "checkpoints" / key.replace("/", "__") / "model.safetensors")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < WEIGHT_TOL, (key, diff)
    rows_a = read_jsonl(micro_run.path / "metrics.jsonl")
    rows_b = read_jsonl(run / "metrics.jsonl")
    assert len(rows_a) == len(rows_b)  # one writer: no duplicated rows
    for ra, rb in zip(rows_a, rows_b):
        assert (ra["key"], ra["step"], ra["split"]) == (rb["key"], rb["step"], rb["split"])
        assert abs(ra["cacc"] - rb["cacc"]) <= METRIC_TOL
        for k in ("loss", "l_cluster", "l_inj"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), (ra["key"], k)
    assert json.loads((run / "progress.json").read_text())["status"] == "done"
    print(f"two-process micro run (cancel + resume): {time.perf_counter() - t0:.1f} s wall, launches included")


def test_accelerate_launch_fsdp_matches_single_process(micro_run, tmp_path):
    """configs/accelerate/fsdp.yaml (FSDP2 full shard, one unit per GPT2Block) on two CPU
    processes, without the baselines: the single-process run's victim / Stage 1 / Stage 2 metrics
    (same stage seeds; METRIC_TOL), weights (WEIGHT_TOL)."""
    root = tmp_path / "runs"
    with (tmp_path / "fsdp.log").open("w") as log:
        proc = subprocess.run(_launch_cmd(["--runs", str(root), "run", "micro", "--no-analyze", "--set",
                                           "defense.baselines=[]"], config="fsdp"),
                              cwd=REPO, env=_launch_env(), stdout=log, stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, (tmp_path / "fsdp.log").read_text()[-3000:]
    folders = [d for d in root.iterdir() if d.is_dir()]
    assert len(folders) == 1
    summary = json.loads((folders[0] / "summary.json").read_text())
    _assert_metrics_close(summary, micro_run.summary, stages=("victim", "stage1", "stage2"))
    for key in ("victim", "stage1", "stage2"):
        a = load_tensors(micro_run.run.checkpoint(key) / "model.safetensors")
        b = load_tensors(folders[0] / "checkpoints" / key / "model.safetensors")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < WEIGHT_TOL, (key, diff)


def test_accelerate_configs_are_not_presets():
    from locphylax_core.config import list_presets
    names = list_presets()
    assert not {"ddp", "fsdp", "cpu_ddp"} & set(names)
    for name in ("ddp", "fsdp", "cpu_ddp"):
        assert (REPO / "configs" / "accelerate" / f"{name}.yaml").is_file()


def test_not_distributed_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert DI.distributed("cpu") is None
    from locphylax_core.cli import _is_main_process
    monkeypatch.delenv("RANK", raising=False)
    assert _is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not _is_main_process()
