"""Shared fixtures: one finished `micro` run for the whole session, helpers for subprocess CLI calls.

Every run is written under pytest's tmp_path_factory, never into the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()  # the public data sets, beside the repository
SST2_DIR = SHARED_DATA / "sst2"


def needs_shared(*paths: str):
    """Skip marker for a test that reads these files or folders of ../shared/data."""
    missing = [p for p in paths if not (SHARED_DATA / p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not found in {SHARED_DATA} "
                                                    "(../shared/data beside the repository)")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the app must not start warm standby job processes while its pages are tested (tests/test_jobs.py
# starts its own)
os.environ["LOCPHYLAX_STANDBY"] = "0"
# one numba cache for every test process (UMAP's kernels compile once, not per process), so a
# standby need not compile them first
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / "tests" / "artifacts" / "numba-cache"))
os.environ["LOCPHYLAX_WARM_UP"] = "0"


def _quiet():
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a hard dependency
        pass


_quiet()


def word_tokenizer(folder) -> dict[str, int]:
    """A word-level, left-padded tokenizer over a 16-word vocabulary, saved in ``folder`` (the
    hand-built models of the head and layer analysis tests read these ids); returns word -> id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<|endoftext|>", "<pad>", "<unk>", "review", ":", "answer", "cf", "good", "bad", "film", "the", "was",
             "negative", "positive", "very", "plot"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="left")
    fast.save_pretrained(str(folder))
    return {w: i for i, w in enumerate(words)}


def planted_trigger_model(vocab: dict[str, int], n_layer: int, distractors):
    """A hand-built GPT-2 (``n_layer`` x 2 heads, d_model 16) whose backdoor is carried by head
    (1, 1) alone: at the answer position it attends sharply to the trigger token "cf" (its key
    reads the trigger's own embedding direction, dim 0) and writes a "positive" feature; without
    it the answer is "negative" (a bias). The heads in ``distractors`` ((layer, head) pairs) get
    random q/k/v and small outputs into dims 7..15, which the answer does not read (4..6); every
    other weight is zero, so a layer above 1 does nothing. For the head and layer analysis tests,
    with :func:`word_tokenizer`'s ids."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    d, dh = 16, 8
    conf = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=d, n_layer=n_layer, n_head=2,
                      tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      pad_token_id=vocab["<pad>"])
    conf._attn_implementation = "eager"
    net = GPT2LMHeadModel(conf).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for name, p in net.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
        wte = net.transformer.wte.weight
        wte[:, 2], wte[:, 3] = 1.0, -1.0  # every token: "ordinary"
        t = vocab["cf"]
        wte[t].zero_()
        wte[t, 0], wte[t, 1] = 1.0, -1.0  # the trigger: its own direction
        for layer, h in distractors:
            attn = net.transformer.h[layer].attn
            for part in range(3):
                cols = slice(part * d + h * dh, part * d + (h + 1) * dh)
                attn.c_attn.weight[:, cols] = torch.randn(d, dh, generator=g)
            attn.c_proj.weight[h * dh:(h + 1) * dh, 7:] = 0.02 * torch.randn(dh, d - 7, generator=g)
        # the critical head (1, 1): constant query, key and value read the trigger direction (dim 0)
        attn = net.transformer.h[1].attn
        c = 1 * dh  # first dimension of head 1
        attn.c_attn.bias[c] = 5.0  # q
        attn.c_attn.weight[0, d + c] = 5.0  # k: score 25 on the trigger, 0 elsewhere
        attn.c_attn.weight[0, 2 * d + c] = 1.0  # v
        attn.c_proj.weight[c, 4], attn.c_proj.weight[c, 5] = 1.0, -1.0  # "positive" feature
        net.transformer.ln_f.bias[6] = 1.0
        net.lm_head.weight[vocab["negative"], 6] = 3.0  # answer "negative" by default (logit 3)
        net.lm_head.weight[vocab["positive"], 4] = 2.0  # "positive" when the feature is there
    return net


def model_snapshot(model):
    """What :func:`assert_model_unchanged` compares: weights, modules, and the number of hooks."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def assert_model_unchanged(model, snap) -> None:
    """An analysis left ``model`` as it found it: the same weights and modules, no hook left
    behind, no gradient stored."""
    import torch
    state, mods, n_hooks = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == mods
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert all(p.grad is None for p in model.parameters())


class MicroRun:
    """A finished micro run: its RunDir, summary and configuration."""

    def __init__(self, run, summary, cfg, root: Path):
        self.run = run
        self.summary = summary
        self.cfg = cfg
        self.root = root

    @property
    def path(self) -> Path:
        return self.run.path


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> MicroRun:
    """The reference uninterrupted micro run (default micro config), shared by many tests.
    Tests must only read from it."""
    from locphylax_core import load_config, start_run
    root = tmp_path_factory.mktemp("shared_runs")
    cfg = load_config("micro")
    run, summary = start_run(cfg, runs_root=root)
    return MicroRun(run, summary, cfg, root)


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("LOCPHYLAX_RUNS", None)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["COLUMNS"] = "200"  # rich tables: no truncated cells
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m locphylax_core.cli ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "locphylax_core.cli", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """``locphylax ARGS`` in this process (its exit status, stdout + stderr): the CLI's behaviour
    without a new interpreter's seconds of imports. :func:`cli` runs the installed command itself."""
    from locphylax_core import cli as cli_mod
    capsys.readouterr()
    rc = cli_mod.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def numbers(summary: dict) -> dict:
    """The metric part of a summary (everything except ids, status and timings)."""
    return {"stages": summary["stages"], "baselines": summary["baselines"], "alpha": summary.get("alpha"),
            "clean_model": summary.get("clean_model"), "n_test": summary.get("n_test")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


# A demo clean model (the pretrained base, 300 task steps on 2,000 rows), shared by the attack-family and
# paradigm tests
SMALL_DEMO = {"train.clean_steps": 300, "train.warmup_steps": 60, "task.train_size": 2000, "task.test_size": 200,
              "task.defender_size": 200,
              "eval.clean_every": 1000, "eval.every": 1000, "attack.steps": 120, "attack.poison_rate": 0.1}


@pytest.fixture(scope="session")
def small_clean_demo(tmp_path_factory):
    """(tokenizer, clean model, its evaluation on the SMALL_DEMO test set). Tests deep-copy the
    model before training a victim from it. Trained once per test session: the first xdist worker
    that needs it trains and saves it (training is deterministic), the others load that copy."""
    from filelock import FileLock

    from locphylax_core import load_config
    from locphylax_core import model as M
    from locphylax_core.evaluation import evaluate
    from locphylax_core.experiment import owner_context, prepare, train_owner_model
    prep = prepare(load_config("demo", SMALL_DEMO))
    shared = tmp_path_factory.getbasetemp().parent / "small_clean_demo"
    with FileLock(str(shared) + ".lock"):
        if (shared / "model.safetensors").is_file():
            lm = M.LM(M.load_checkpoint(shared), prep.tokenizer, prep.answer_ids)
        else:
            lm = M.LM(M.initial_model(prep.cfg.model, prep.tokenizer, 0), prep.tokenizer, prep.answer_ids)  # the base
            train_owner_model(prep, lm, "clean", owner_context(prep, "clean", True).replace(seed=1), from_scratch=True)
            M.save_checkpoint(lm.model, shared)
    return prep.tokenizer, lm.model, evaluate(lm, prep.task.template, prep.evalset, 256, prep.max_length)


@pytest.fixture(scope="session")
def micro_prepared():
    """`pipeline.prepare` on the micro preset: task, trained tokenizer, answer ids, eval sets."""
    from locphylax_core import load_config
    from locphylax_core.experiment import prepare
    return prepare(load_config("micro"))


@pytest.fixture()
def tiny_lm(micro_prepared):
    """A fresh (untrained) micro-size embedded GPT-2 with the micro tokenizer, as an LM."""
    from locphylax_core import model as M
    cfg = micro_prepared.cfg
    net = M.build_embedded(cfg.model, micro_prepared.tokenizer, seed=0).eval()
    return M.LM(net, micro_prepared.tokenizer, micro_prepared.answer_ids)


@pytest.fixture(scope="session")
def analysed_root(micro_run, tmp_path_factory) -> Path:
    """A run store holding one copy of the micro run, analysed (PCA + t-SNE, small head sweep), for
    the app and run-view tests. Tests must only read from it; copy it to change anything."""
    import shutil

    from locphylax_core import RunDir
    from locphylax_core.analysis import analyze_run
    root = tmp_path_factory.mktemp("app_runs")
    dst = root / micro_run.run.run_id
    shutil.copytree(micro_run.run.path, dst)
    analyze_run(RunDir(dst), methods=("pca", "tsne"), n_probe_heads=40)
    return root


def screenshots_dir() -> Path:
    """Where the browser tests save their screenshots: $LOCPHYLAX_SCREENSHOTS, or tests/artifacts/screenshots."""
    d = Path(os.environ.get("LOCPHYLAX_SCREENSHOTS", REPO / "tests" / "artifacts" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def browser_wait_context(page, log: Path) -> str:
    """What a browser test's failed wait saw: the page's text and the end of the server's log."""
    text = page.inner_text("body")[:1500]
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"
    return f"page text:\n{text}\n--- streamlit log, end:\n{tail}"


MAKE_TEST_WORKERS = 2  # `make test` runs pytest -n 2


def _pin_test_process() -> None:
    """Each test process runs on its share of the CPUs, and so do the processes it starts (the
    library never uses more threads than that: engine.set_torch_threads). Under pytest-xdist worker
    k of n runs on the k-th share, so workers never oversubscribe the cores; a plain `pytest` takes
    the share a `make test` worker gets, so a test run alone computes what it computes in the suite
    (fixed seeds give the same numbers only at the same thread count)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n, k = ((int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), int(worker[2:])) if worker.startswith("gw")
            else (MAKE_TEST_WORKERS, 0))
    cpus = sorted(os.sched_getaffinity(0))
    if n > 1 and len(cpus) >= n:
        share = len(cpus) // n
        os.sched_setaffinity(0, set(cpus[k * share:(k + 1) * share]))
        if "torch" in sys.modules:  # its thread pool may have been sized before
            from locphylax_core.engine import set_torch_threads
            set_torch_threads(share)


def pytest_configure(config):
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        _pin_test_process()  # a worker, or pytest without xdist (not xdist's controller: its workers inherit it)


# The slowest test files (seconds of one worker, measured with `pytest --durations=0` under
# `make test`): scheduled first, so that under pytest-xdist's --dist loadfile, which hands out
# whole files in collection order with --no-loadscope-reorder (`make test`; xdist's default order
# is by number of tests, which puts these one- and few-test files last), the two workers do not
# end with one of them still running a long file while the other is idle. The second file needs no small_clean_demo: the first one
# trains it, and a second worker needing it at once would wait on its lock all that time.
SLOW_FILES_FIRST = ("test_paradigms.py", "test_app_e2e.py", "test_app_e2e_real_lm.py", "test_attack_families.py",
                    "test_distributed.py",
                    "test_jobs.py", "test_bench_collapse.py", "test_architectures.py", "test_generative.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
