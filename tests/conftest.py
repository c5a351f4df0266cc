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
    from locphylax_core.pipeline import prepare, train_owner_model
    prep = prepare(load_config("demo", SMALL_DEMO))
    shared = tmp_path_factory.getbasetemp().parent / "small_clean_demo"
    with FileLock(str(shared) + ".lock"):
        if (shared / "model.safetensors").is_file():
            lm = M.LM(M.load_checkpoint(shared), prep.tokenizer, prep.answer_ids)
        else:
            lm = M.LM(M.initial_model(prep.cfg.model, prep.tokenizer, 0), prep.tokenizer, prep.answer_ids)  # the base
            train_owner_model(prep, lm, "clean", from_scratch=True, seed=1)
            M.save_checkpoint(lm.model, shared)
    return prep.tokenizer, lm.model, evaluate(lm, prep.task.template, prep.evalset, 256, prep.max_length)


@pytest.fixture(scope="session")
def micro_prepared():
    """`pipeline.prepare` on the micro preset: task, trained tokenizer, answer ids, eval sets."""
    from locphylax_core import load_config
    from locphylax_core.pipeline import prepare
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


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`make test` runs two workers), worker k runs on CPU k only, and so do the
    processes it starts: the library never uses more threads than that (engine.set_torch_threads),
    so two workers never oversubscribe the cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        if n > 1 and len(cpus) >= n:
            k = int(worker[2:])
            share = len(cpus) // n
            os.sched_setaffinity(0, set(cpus[k * share:(k + 1) * share]))


_pin_xdist_worker()


# The slowest test files (seconds of one worker, measured with `pytest --durations=0` under
# `make test`): scheduled first, so that under pytest-xdist's --dist loadfile, which hands out
# whole files in collection order with --no-loadscope-reorder (`make test`; xdist's default order
# is by number of tests, which puts these one- and few-test files last), the two workers do not
# end with one of them still running a long file while the other is idle. The second file needs no small_clean_demo: the first one
# trains it, and a second worker needing it at once would wait on its lock all that time.
SLOW_FILES_FIRST = ("test_paradigms.py", "test_app_e2e.py", "test_attack_families.py", "test_distributed.py",
                    "test_jobs.py", "test_bench_collapse.py", "test_architectures.py", "test_generative.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
