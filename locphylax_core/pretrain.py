"""Pretraining the project's own base language model on the corpus of ``locphylax corpus``.

    locphylax pretrain --size small                 # the shipped base (2 x 128), about an hour on 2 CPU cores
    locphylax pretrain --size medium --set device=cuda   # a 4 x 256 base with 256 positions (not shipped)

What it does, top to bottom (:func:`pretrain`): train the byte-level BPE tokenizer on the
corpus's training text, encode the corpus once into two token streams (train and held-out), build
the decoder-only model, and train it with the project's training loop (:func:`trainer.fit`)
on windows of ``seq_len`` tokens drawn at random offsets of the train stream. Every ``eval_every``
steps the held-out perplexity is measured on fixed windows of the held-out stream and appended to
``curve.jsonl``; every ``checkpoint_every`` steps the weights, the AdamW state and the step are
saved (safetensors and JSON, never pickle). The batch of step ``s`` depends only on the seed and
``s``, so a killed or cancelled run resumes (run the same command again) to the same weights as an
uninterrupted one. When the last step is done the base is exported to ``OUT/base``: fp16 weights,
the tokenizer, ``base.json`` (shape, steps, tokens, held-out perplexity, where and how long it
trained, the corpus manifest, checksums) and a model card, ready for ``model.base``.

On a GPU, ``bf16`` autocast is on by default and the model-FLOPs utilisation (MFU, against the
GPU's dense bf16 peak) is measured and printed with every evaluation. Several GPUs:
``accelerate launch --config_file configs/accelerate/ddp.yaml -m locphylax_core.cli pretrain ...``
(every rank takes its shard of each step's batch; rank 0 writes).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator

from . import bases
from . import model as M
from .architectures import EMBEDDED_ARCHS
from .config import ModelConfig, _format_validation_error, _parse_value, _Section
from .corpus import read_manifest
from .distributed import distributed
from .engine import Batch, set_torch_threads
from .errors import ConfigError, DataError, RunError
from .runs import atomic_write_json, atomic_write_text, file_sha256, write_folder_atomically
from .trainer import CancelFile, Reporter, Resume, StageContext, TrainSettings, fit

# The pretraining recipes: shape and budget of each named base. "small" keeps `make demo` fast on
# 2 CPU cores and is the base of the demo and SST-2 presets; "medium" (256 positions, which AG News needs)
# is a recipe, not shipped: about 2 h at 2 threads for 4,000 steps here.
SIZES: dict[str, dict] = {
    "small": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128, "seq_len": 128, "batch_size": 32,
              "steps": 4000, "lr": 1e-3},
    "medium": {"n_layer": 4, "n_embd": 256, "n_head": 8, "n_positions": 256, "seq_len": 256, "batch_size": 16,
               "steps": 4000, "lr": 8e-4},
}
# dense bf16 peak FLOP/s of the GPUs the MFU is quoted against (vendor data sheets, SXM parts)
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                 "RTX 4090": 165e12, "V100": 125e12}


class PretrainConfig(_Section):
    size: str = "small"  # a recipe of SIZES; the fields below override it
    corpus: str = "corpus"  # a folder written by `locphylax corpus`
    out: Optional[str] = None  # default: pretrain/<size>
    arch: Literal[EMBEDDED_ARCHS] = "gpt2"  # architectures.EMBEDDED_ARCHS
    vocab_size: int = Field(8192, ge=300, le=262144)
    n_layer: int = Field(2, ge=1, le=48)
    n_embd: int = Field(128, ge=8, le=8192)
    n_head: int = Field(4, ge=1, le=128)
    n_positions: int = Field(128, ge=8, le=32768)
    seq_len: int = Field(128, ge=8)  # tokens per training window
    batch_size: int = Field(32, ge=1)
    steps: int = Field(4000, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)  # then cosine decay to 10% of lr
    weight_decay: float = Field(0.1, ge=0)  # on weight matrices only
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    eval_every: int = Field(200, ge=1)
    eval_windows: int = Field(256, ge=1)  # held-out windows of seq_len tokens per evaluation
    checkpoint_every: int = Field(200, ge=1)
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    bf16: Optional[bool] = None  # None: on for CUDA, off on CPU
    compile: bool = False  # torch.compile the model (GPU)
    threads: int = Field(2, ge=1, le=256)

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data):
        if isinstance(data, dict):
            size = data.get("size", "small")
            if size not in SIZES:
                raise ValueError(f"size: unknown size {size!r}; allowed: {list(SIZES)}")
            data = {**SIZES[size], **data}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd: {self.n_embd} must be divisible by n_head ({self.n_head})")
        if self.seq_len > self.n_positions:
            raise ValueError(f"seq_len: {self.seq_len} windows do not fit the model's {self.n_positions} positions")
        if self.grad_accum > self.batch_size:
            raise ValueError(f"grad_accum: {self.grad_accum} micro-batches need a batch of at least as many rows "
                             f"(batch_size is {self.batch_size})")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"pretrain/{self.size}")

    def as_model_config(self) -> ModelConfig:
        return ModelConfig(source="embedded", base=bases.SCRATCH, arch=self.arch, n_layer=self.n_layer,
                           n_embd=self.n_embd, n_head=self.n_head, n_positions=self.n_positions,
                           vocab_size=self.vocab_size)

    def training_fields(self) -> dict:
        """What a resumed run must share with the one it continues (everything but housekeeping)."""
        return self.model_dump(exclude={"out", "device", "threads", "eval_every", "eval_windows",
                                        "checkpoint_every", "compile"})


def load_pretrain_config(overrides: dict | list[str] | None = None) -> PretrainConfig:
    items = overrides.items() if isinstance(overrides, dict) else \
        [(k.strip(), _parse_value(v)) for k, v in (_split(o) for o in overrides or [])]
    try:
        return PretrainConfig.model_validate(dict(items))
    except ValidationError as e:
        raise _format_validation_error(e, "pretrain settings") from None


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return tuple(item.split("=", 1))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Data: token streams and windows


def encode_lines(tokenizer, path: Path, batch: int = 4096) -> torch.Tensor:
    """Every line of a text file as tokens, each followed by the end-of-text token, in one stream."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for i in range(0, len(lines), batch):
        for ids in tokenizer(lines[i:i + batch], add_special_tokens=False)["input_ids"]:
            out += ids
            out.append(eos)
    return torch.tensor(out, dtype=torch.int32)


def window_batch(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int, device) -> Batch:
    """Step ``step``'s batch: ``batch_size`` windows at offsets drawn from (seed, step) alone."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
    ids = torch.stack([stream[s:s + seq_len] for s in starts.tolist()]).long()
    ones = torch.ones_like(ids)
    return Batch(ids.to(device), ones.to(device), torch.arange(seq_len).expand_as(ids).to(device))


def windows(stream, start_step, batch_size, seq_len, seed, device):
    step = start_step
    while True:
        step += 1
        yield window_batch(stream, step, batch_size, seq_len, seed, device)


def packed_lm_loss(model, batch: Batch, _step: int):
    """Next-token cross-entropy over every position of full (unpadded) windows."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch.input_ids[:, 1:].reshape(-1))
    return loss, {"loss": loss.item()}


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int, device, batch_size: int = 32) -> float:
    """Mean next-token loss over the first ``max_windows`` non-overlapping held-out windows."""
    n = min(max_windows, len(stream) // seq_len)
    if n < 1:
        raise DataError(f"the held-out split has {len(stream)} tokens, fewer than one window of {seq_len}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        ids = stream[i * seq_len:min(n, i + batch_size) * seq_len].view(-1, seq_len).long().to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward and backward through the weights; the position table
    is a lookup) + 12 L d T (attention scores and values), as in the PaLM paper's appendix B."""
    conf = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    layers = getattr(conf, "n_layer", None) or conf.num_hidden_layers
    width = getattr(conf, "n_embd", None) or conf.hidden_size
    return 6 * n + 12 * layers * width * seq_len


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def gpu_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and, for a GPU of :data:`GPU_BF16_PEAK`, its dense bf16 peak FLOP/s."""
    if device.type != "cuda":
        return cpu_name(), None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)


# ----------------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoints/step-NNNNNNN/ written whole, then OUT/latest points to it


def _optimizer_tensors(state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in {**tensors, **meta["scalars"]}.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(out: Path, step: int, model, optimizer, info: dict) -> None:
    from safetensors.torch import save_file
    tensors, meta = _optimizer_tensors(optimizer.state_dict())

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "trainer.json", {"step": step, "optimizer": meta, **info})

    folder = out / "checkpoints" / f"step-{step:07d}"
    write_folder_atomically(folder, write)
    atomic_write_text(out / "latest", folder.name + "\n")
    for old in (out / "checkpoints").glob("step-*"):  # the newest whole checkpoint is all a resume needs
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if pointer.is_file():
        folder = out / "checkpoints" / pointer.read_text().strip()
        if (folder / "trainer.json").is_file():
            return folder
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def load_trainer_state(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file
    info = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    return info, _optimizer_state(load_file(str(folder / "optimizer.safetensors")), info["optimizer"])


# ----------------------------------------------------------------------------------------------
# One process at a time


class FolderLock:
    """``OUT/LOCK`` holds the pid of the process pretraining into OUT; a lock whose process is gone
    is taken over."""

    def __init__(self, out: Path):
        self.path = out / "LOCK"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise RunError(f"{self.path.parent}: another process (pid {pid}) is pretraining into this "
                                   "folder; wait for it, or `locphylax pretrain --cancel` it") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RunError(f"{self.path}: cannot take the lock")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# The run


def _device(cfg: PretrainConfig) -> torch.device:
    dist = distributed(cfg.device)
    if dist is not None:
        return dist.device
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for and no CUDA GPU is available here; use device=cpu or auto")
    return torch.device(cfg.device)


def prepare_data(cfg: PretrainConfig, out: Path, message=print):
    """The tokenizer and the two token streams, built once and kept in ``out``."""
    from safetensors.torch import load_file, save_file
    corpus = Path(cfg.corpus)
    manifest = read_manifest(corpus)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        message(f"training the {cfg.vocab_size}-token byte-level BPE tokenizer on {corpus / 'train.txt'}")
        lines = (corpus / "train.txt").read_text(encoding="utf-8").splitlines()
        M.save_tokenizer(M.train_tokenizer(lines, cfg.vocab_size), tok_dir)
    tokenizer = M.load_tokenizer(str(tok_dir))
    streams = out / "tokens.safetensors"
    if not streams.is_file():
        message("encoding the corpus")
        data = {name: encode_lines(tokenizer, corpus / f"{name}.txt") for name in ("train", "heldout")}
        tmp = streams.with_name(".tokens.safetensors.tmp")
        save_file(data, str(tmp))
        tmp.replace(streams)
    data = load_file(str(streams))
    if len(data["train"]) <= cfg.seq_len:
        raise DataError(f"{corpus}: the training text has {len(data['train'])} tokens, fewer than one window "
                        f"of seq_len={cfg.seq_len}")
    return tokenizer, data["train"], data["heldout"], manifest


def _check_same_run(out: Path, cfg: PretrainConfig) -> None:
    saved = out / "pretrain.json"
    if saved.is_file():
        before = json.loads(saved.read_text(encoding="utf-8"))
        now = cfg.training_fields()
        diff = [k for k in now if before.get(k) != now[k]]
        if diff:
            k = diff[0]
            raise ConfigError(f"{k}: {out} was started with {k}={before.get(k)!r}, not {now[k]!r}; resume with the "
                              f"same settings or give another out folder")
    else:
        atomic_write_json(saved, cfg.training_fields())


def pretrain(cfg: PretrainConfig, reporter=None, command: str | None = None) -> dict:
    """Train (or resume) the base of ``cfg`` in ``cfg.out_dir`` and export it; returns base.json."""
    reporter = reporter or Reporter()
    set_torch_threads(cfg.threads)
    out = cfg.out_dir
    dist = distributed(cfg.device)
    main = dist is None or dist.is_main
    if dist is not None and dist.fsdp:
        raise ConfigError("pretrain: FSDP is not supported (its sharded optimizer state is not checkpointed); "
                          "use configs/accelerate/ddp.yaml")
    device = _device(cfg)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    if main:
        out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out) if main else None
    if lock:
        lock.__enter__()
    try:
        if main:
            _check_same_run(out, cfg)
            tokenizer, train, held, manifest = prepare_data(cfg, out, reporter.message)
        if dist is not None:
            dist.barrier()
        if not main:
            tokenizer, train, held, manifest = prepare_data(cfg, out, lambda m: None)
        return _train(cfg, out, device, bf16, tokenizer, train, held, manifest, reporter, main, dist, command)
    finally:
        if lock:
            lock.__exit__(None, None, None)


def _train(cfg, out, device, bf16, tokenizer, train, held, manifest, reporter, main, dist, command) -> dict:
    mcfg = cfg.as_model_config().model_copy(update={"vocab_size": len(tokenizer)})
    ckpt = latest_checkpoint(out)
    info = {"step": 0, "tokens": 0, "seconds": 0.0}
    resume_state = None
    if ckpt is not None:
        model = M.load_checkpoint(ckpt, device)
        info, resume_state = load_trainer_state(ckpt)
        reporter.message(f"resuming {out} from step {info['step']}")
    else:
        model = M.build_embedded(mcfg, tokenizer, cfg.seed).to(device)
    model.config._attn_implementation = "sdpa"  # fused causal attention while training; analyses load eager
    start = info["step"]
    if main:  # the curve up to the checkpoint (rows of a cut-off stretch are measured again)
        _keep_curve(out, start)
    fpt = flops_per_token(model, cfg.seq_len)
    device_name, peak = gpu_peak(device)
    world = dist.world if dist is not None else 1
    clock = {"t": time.perf_counter(), "tokens": info["tokens"], "seconds": info["seconds"], "last_step": start}
    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_model = torch.compile(model) if cfg.compile else model

    def elapsed() -> float:
        return clock["seconds"] + time.perf_counter() - clock["t"]

    def evaluate(step: int, logs: dict) -> None:
        now = time.perf_counter()
        steps_done = step - clock["last_step"]
        rate = steps_done * tokens_per_step / max(1e-9, now - clock["t_eval"]) if "t_eval" in clock else None
        loss = heldout_loss(model, held, cfg.seq_len, cfg.eval_windows, device)
        row = {"step": step, "tokens": step * tokens_per_step, "train_loss": logs.get("loss"),
               "heldout_loss": loss, "heldout_ppl": float(torch.tensor(loss).exp()), "seconds": round(elapsed(), 1),
               "tokens_per_s": None if rate is None else round(rate, 1),
               "tflops": None if rate is None else round(rate * fpt / 1e12, 4),
               "mfu": None if rate is None or peak is None else round(rate * fpt / (peak * world), 4)}
        if main:
            with (out / "curve.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        mfu = "n/a (no GPU peak known)" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        speed = "" if rate is None else f", {rate:,.0f} tokens/s, {row['tflops']:.3f} TFLOP/s, MFU {mfu}"
        reporter.message(f"step {step}: held-out loss {loss:.4f} (perplexity {row['heldout_ppl']:.1f}), "
                         f"train loss {logs.get('loss', float('nan')):.4f}{speed}")
        clock["last_step"], clock["t_eval"] = step, time.perf_counter()

    def checkpoint(step: int, optimizer) -> None:
        if main:
            save_checkpoint(out, step, model, optimizer,
                            {"tokens": step * tokens_per_step, "seconds": round(elapsed(), 2)})

    clock["t_eval"] = time.perf_counter()
    reporter.stage_started("pretrain", cfg.steps)
    if start and hasattr(reporter, "advance"):
        reporter.advance(start, {})
    if start < cfg.steps:
        settings = TrainSettings(lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                                 grad_clip=cfg.grad_clip, every=cfg.eval_every, schedule="cosine",
                                 warmup=cfg.warmup_steps, grad_accum=cfg.grad_accum, bf16=bf16)
        ctx = StageContext(settings=settings, observer=evaluate, progress=reporter, cancel=CancelFile(out / "CANCEL"),
                           dist=dist, key="pretrain")  # seed None: the windows are seeded by cfg.seed
        fit(SimpleNamespace(model=train_model), windows(train, start, cfg.batch_size, cfg.seq_len, cfg.seed, device),
            cfg.steps, ctx, step_loss=packed_lm_loss,
            resume=Resume(start, resume_state, checkpoint, cfg.checkpoint_every, decay_matrices_only=True))
    reporter.stage_finished("pretrain", {})
    card = {}
    if main:
        card = export_base(out, model, tokenizer, cfg, manifest, device_name=device_name, bf16=bf16,
                           command=command, world=world)
        reporter.message(f"base written to {out / 'base'} (held-out perplexity {card['heldout_ppl']:.2f})")
    return card


def _keep_curve(out: Path, upto: int) -> None:
    path = out / "curve.jsonl"
    if path.is_file():
        rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= upto]
        atomic_write_text(path, "".join(r + "\n" for r in kept))


def read_curve(out: Path) -> list[dict]:
    path = Path(out) / "curve.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


# ----------------------------------------------------------------------------------------------
# Export: the base folder that model.base loads


def export_base(out: Path, model, tokenizer, cfg: PretrainConfig, manifest: dict, *, device_name: str,
                bf16: bool, command: str | None, world: int = 1) -> dict:
    curve = read_curve(out)
    last = curve[-1] if curve else {}
    info = json.loads((latest_checkpoint(out) / "trainer.json").read_text(encoding="utf-8"))
    folder = out / "base"

    def write(tmp: Path) -> None:
        half = M.build_embedded(cfg.as_model_config().model_copy(update={"vocab_size": len(tokenizer)}), tokenizer, 0)
        half.load_state_dict(model.state_dict())
        half.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        card = {
            "schema": 1, "name": cfg.size, "arch": cfg.arch, "shape": {k: getattr(cfg, k) for k in (
                "n_layer", "n_embd", "n_head", "n_positions")}, "vocab_size": len(tokenizer),
            "parameters": M.count_parameters(model), "dtype": "float16",
            "steps": info["step"], "tokens_seen": info["tokens"], "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay, "seed": cfg.seed,
            "heldout_loss": last.get("heldout_loss"), "heldout_ppl": last.get("heldout_ppl"),
            "curve": [{k: r[k] for k in ("step", "heldout_ppl", "train_loss")} for r in curve],
            "trained_on": {"device": device_name, "processes": world, "bf16": bf16, "threads": cfg.threads,
                           "torch": torch.__version__, "python": platform.python_version(),
                           "seconds": info["seconds"]},
            "command": command or f"locphylax pretrain --size {cfg.size}",
            "corpus": {"files": manifest["files"], "sources": [
                {k: s[k] for k in ("name", "package", "licence", "texts", "words")} for s in manifest["sources"]],
                "test_splits": manifest["test_splits"]},
            "files": files,
        }
        atomic_write_json(tmp / bases.CARD, card)
        atomic_write_text(tmp / "README.md", model_card(card))

    write_folder_atomically(folder, write)
    return bases.read_card(folder)


def model_card(card: dict) -> str:
    s = card["shape"]
    tr = card["trained_on"]
    rows = "\n".join(f"| {src['name']} | {src['package']} | {src['licence']} | {src['texts']:,} | {src['words']:,} |"
                     for src in card["corpus"]["sources"])
    curve = ", ".join(f"{r['step']}: {r['heldout_ppl']:.1f}" for r in card["curve"])
    files = "\n".join(f"    {h}  {n}" for n, h in card["files"].items())
    train_file = card["corpus"]["files"]["train.txt"]
    return f"""# Locphylax base `{card['name']}`

A decoder-only language model ({card['arch']}, {s['n_layer']} blocks x {s['n_embd']} wide, {s['n_head']} heads,
{s['n_positions']} positions, {card['vocab_size']:,}-token byte-level BPE; {card['parameters']:,} parameters)
pretrained by `locphylax pretrain` on the project's own English corpus. It is the starting point of
every embedded model whose configuration says `model.base: {card['name']}`.

## Training

- {card['steps']:,} steps of {card['batch_size']} windows x {card['seq_len']} tokens: **{card['tokens_seen']:,} tokens seen**
  ({card['tokens_seen'] / max(1, train_file['words']):.2f} tokens per corpus word).
- AdamW (0.9, 0.95), learning rate {card['lr']:g}, {card['warmup_steps']} warm-up steps, cosine decay to 10%,
  weight decay {card['weight_decay']:g} on weight matrices, gradient clipping 1.0, seed {card['seed']}.
- Trained on {tr['device']} ({tr['processes']} process(es), {tr['threads']} threads, bf16 {tr['bf16']}),
  torch {tr['torch']}, in {tr['seconds'] / 60:.1f} minutes.
- **Held-out perplexity {card['heldout_ppl']:.2f}** (loss {card['heldout_loss']:.4f}) on the corpus's held-out 1%.
- Held-out perplexity by step: {curve}.
- Weights are stored in {card['dtype']}; they are loaded in float32.

Rebuild: `{card['command']}` (after `make corpus`). Training is deterministic: the batch of a step
depends only on the seed and the step, and a resumed run gives the same weights as an uninterrupted
one. The same command on the same kind of machine (CPU type, torch version, thread count) gives the
same float32 weights; elsewhere the order of floating-point sums differs, and the weights with it.

## Corpus

{train_file['texts']:,} texts, {train_file['words']:,} words for training; the held-out split is
{card['corpus']['files']['heldout.txt']['words']:,} words. Dictionary markup, pronunciations and headwords are stripped.

| source | package | licence | texts | words |
| --- | --- | --- | ---: | ---: |
{rows}

No dev or test split of any task is in it: {card['corpus']['test_splits']['rule']}; checked against
{', '.join(card['corpus']['test_splits']['checked_against'])}.

## Files (sha256; checked every time the base is loaded)

{files}
"""


__all__ = ["SIZES", "PretrainConfig", "load_pretrain_config", "pretrain", "heldout_loss", "window_batch",
           "flops_per_token", "export_base", "read_curve", "latest_checkpoint"]
