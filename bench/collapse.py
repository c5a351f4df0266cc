"""Collapse benchmark: does the defense remove unknown triggers it never sees?

For every preset, seed and unknown trigger of ``bench/collapse_triggers.yaml`` it builds the
victim (clean model -> poisoned fine-tune, exactly as ``locphylax run`` does), then runs each
requested defense *variant* on the same victim, defender data and step budget, and scores CACC,
unknown-trigger ASR and known-trigger ASR after Stage 1 and Stage 2.

    # the reported benchmark: the report triggers, 3 seeds, both presets, the shipped default
    # against the paper's reference method and the baselines; writes docs/results.md
    .venv/bin/python -m bench.collapse report
    # the lever study (tune triggers only): one row per lever setting
    .venv/bin/python -m bench.collapse levers
    # rebuild CSVs and docs/results.md from the cached rows, computing nothing
    .venv/bin/python -m bench.collapse docs

(from the repository root, where ``bench`` is a package).

Trained clean models and victims are cached under ``bench/.cache/`` and every scored row is
cached too, so a cut-off benchmark resumes where it stopped, and the lever study reuses victims.
The defense only ever receives the victim and ``DefenderData``, as in the pipeline.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.collapse_docs import METRICS, read_runs_csv, write_docs  # noqa: E402
from bench.common import RESULTS, ROOT, mean_sd, write_csv  # noqa: E402  (one mean ± sd for every benchmark)
from locphylax_core import model as M  # noqa: E402
from locphylax_core.config import load_config  # noqa: E402
from locphylax_core.evaluation import evaluate  # noqa: E402
from locphylax_core.experiment import (as_lm, fresh_model, method_context, owner_context, prepare, run_device,  # noqa: E402
                                       run_method, train_owner_model)
from locphylax_core.runs import atomic_write_text  # noqa: E402

CACHE = Path(os.environ.get("LOCPHYLAX_BENCH_CACHE", ROOT / "bench" / ".cache" / "collapse"))
OUT = RESULTS
DOCS = ROOT / "docs"
GRID = yaml.safe_load((ROOT / "bench" / "collapse_triggers.yaml").read_text())

# Defense variants: overrides of the run config (defense section) and the methods to run.
# "ref" is the paper's method as specified; "default" is whatever the presets ship.
BASELINES = ["clean_ft", "unlearn_single", "no_cluster"]
DIVERSE4 = [{"text": "vx", "position": "random"}, {"text": "as seen on channel four", "position": "random"},
            {"text": "qz", "position": "start"}, {"text": "the weather was mild all week long", "position": "end"}]
DIVERSE8 = DIVERSE4 + [{"text": "jk", "position": "end"}, {"text": "¤", "position": "random"},
                       {"text": "for what it is worth", "position": "start"},
                       {"text": "my neighbour painted the fence green on a sunny saturday", "position": "start"}]
VARIANTS: dict[str, dict] = {
    "ref": {"defense.method": "locphylax"},
    "ref+baselines": {"defense.method": "locphylax", "baselines": BASELINES},
    "default+baselines": {"baselines": BASELINES},
    # the baselines of issue 6 (P2P-style benign injection, fine-pruning, CROW), beside the default
    "default+new": {"baselines": ["p2p", "fine_pruning", "crow"]},
    "default+onion": {"baselines": ["onion"]},
    # issue 17: the baselines made faithful to their peers' code, and the vaccination peer, on the same victims
    "faithful": {"baselines": ["fine_pruning", "crow", "onion", "bdvax"]},
    # the same three baselines as they were before issue 17 (their options keep the earlier rules)
    "earlier": {"baselines": ["fine_pruning", "crow", "onion"],
                "defense.options": {"fine_pruning": {"prune_rate": 0.3, "rank": "signed"},
                                    "crow": {"pairs": "with_final_norm", "weight": 1.0},
                                    "onion": {"fluency": "victim"}}},
    # the report's default, reference and baselines in one variant, on the same victims (issue 13's base report)
    "default+reference+baselines": {"baselines": ["reference", *BASELINES]},  # input-side (issue 6); about a minute of filtering per cell
    # every defense of the families x defenses table on one victim (the paper's method as "reference")
    "default+all": {"baselines": ["reference", *BASELINES, "p2p", "fine_pruning", "crow", "onion", "bdvax"]},
    # levers, each one change from the reference
    "target=correct": {"defense.known_target": "correct"},
    "target=canary": {"defense.known_target": "canary"},
    "target=negative": {"defense.known_target": "negative"},
    "triggers=1": {"defense.known_triggers": DIVERSE4[:1]},
    "triggers=4": {"defense.known_triggers": DIVERSE4},
    "triggers=8": {"defense.known_triggers": DIVERSE8},
    "stage2=after_layer": {"defense.stage2_params": "after_layer"},
    "stage2=lora": {"defense.stage2_params": "lora"},
    "layer=0": {"defense.layer": 0},
    "pos=mean": {"defense.token_position": "mean"},
    "after_final_norm": {"defense.after_final_norm": True},
    "alpha=0.01": {"defense.alpha": 0.01},
    "alpha=0.1": {"defense.alpha": 0.1},
    "alpha=1": {"defense.alpha": 1.0},
    "steps=x0.5": {"defense.stage1_steps": 0.5, "defense.stage2_steps": 0.5},
    "steps=x2": {"defense.stage1_steps": 2.0, "defense.stage2_steps": 2.0},
    "consistency=1": {"defense.consistency_weight": 1.0},
    "consistency=10": {"defense.consistency_weight": 10.0},
    "no_cluster": {"defense.alpha": 0.0},
    "generated=0.3": {"defense.stage2_generated_rate": 0.3},
    "generated=1": {"defense.stage2_generated_rate": 1.0},
    "canary+generated=1": {"defense.known_target": "canary", "defense.stage2_generated_rate": 1.0},
    "lora+generated=1": {"defense.stage2_params": "lora", "defense.stage2_generated_rate": 1.0},
    # the learning-rate schedule shared by every method of a run (not a locphylax+ setting)
    "cosine": {"defense.schedule": "cosine"},
    "cosine+baselines": {"defense.schedule": "cosine", "baselines": BASELINES},
    "cosine+canary": {"defense.schedule": "cosine", "defense.known_target": "canary"},
    "cosine+canary+consistency=0.1": {"defense.schedule": "cosine", "defense.known_target": "canary",
                                      "defense.consistency_weight": 0.1},
    "cosine+generated=1": {"defense.schedule": "cosine", "defense.stage2_generated_rate": 1.0},
    "cosine+canary+generated=1": {"defense.schedule": "cosine", "defense.known_target": "canary",
                                  "defense.stage2_generated_rate": 1.0},
    # round 2: the strongest single levers of round 1, alone at a gentler setting and combined
    "consistency=0.1": {"defense.consistency_weight": 0.1},
    "canary+lora": {"defense.known_target": "canary", "defense.stage2_params": "lora"},
    "lora+consistency=0.1": {"defense.stage2_params": "lora", "defense.consistency_weight": 0.1},
    "canary+lora+consistency=0.1": {"defense.known_target": "canary", "defense.stage2_params": "lora",
                                    "defense.consistency_weight": 0.1},
}
# the shortest comparison on the real LM (issue 33), when compute allows no more: the default against
# clean fine-tuning on the same victim (after the levers, so no lever set changes)
VARIANTS["default+clean_ft"] = {"baselines": ["clean_ft"]}
# the study of the number and kind of known triggers (issue 33), each a change from the reference
# (whose two known triggers are one word, `vx`, and one phrase, `as seen on channel four`)
VARIANTS["triggers=1phrase"] = {"defense.known_triggers": DIVERSE4[1:2]}
VARIANTS["triggers=2words"] = {"defense.known_triggers": DIVERSE4[0::2]}
VARIANTS["triggers=2phrases"] = {"defense.known_triggers": DIVERSE4[1::2]}
# the registered defenses not in default+reference+baselines, so the families x defenses table of a
# victim can be completed beside an earlier report run
VARIANTS["default+others"] = {"baselines": ["augment_ft", "p2p", "fine_pruning", "crow", "onion", "bdvax"]}
# the defense's learning rate on the real LM (issue 33): at the preset's 5e-4 the reference's known
# triggers reach only 4-8% ASR after Stage 1, so its injection barely takes; chosen on `cf` only
VARIANTS["lr=1e-3"] = {"defense.lr": 1e-3}
VARIANTS["lr=2e-3"] = {"defense.lr": 2e-3}
VARIANTS["lr=4e-3"] = {"defense.lr": 4e-3}
VARIANTS["default+lr=2e-3"] = {"defense.lr": 2e-3}
# the contrast at the same learning rate: clean fine-tuning alone ("only": the methods the cell runs)
VARIANTS["lr=2e-3:clean_ft"] = {"defense.lr": 2e-3, "only": ["clean_ft"]}
VARIANTS["lr=2e-3:no_cluster"] = {"defense.lr": 2e-3, "only": ["no_cluster"]}
VARIANTS["lr=2e-3:unlearn_single"] = {"defense.lr": 2e-3, "only": ["unlearn_single"]}
SCALED = ("defense.stage1_steps", "defense.stage2_steps")  # values are multipliers of the preset's

# Levers on the model itself (they change the victim, so they need their own clean models)
SHARED = "../shared/data"
MODEL_LEVERS: dict[str, dict] = {
    # each preset's model as it was before the pretrained bases: random weights, a tokenizer trained
    # on the task, the preset's old shape and vocabulary (SCRATCH_MODELS); the task steps are the same
    "scratch": {"model.base": "scratch"},
    "size=4x256": {"model.base": "scratch", "model.n_layer": 4, "model.n_embd": 256},
}
SCRATCH_MODELS: dict[str, dict] = {
    "demo": {"model.n_positions": 64, "model.vocab_size": 1024, "train.lm_loss_weight": 1.0},
    "sst2": {"model.n_positions": 96, "model.vocab_size": 8000},
    "agnews": {"model.n_positions": 256, "model.vocab_size": 2048},
}

THREADS: int | None = None  # --threads: overrides train.threads (not part of any cache key)


def prepare_data(cfg, tokenizer=None):
    """The pipeline's prepared task, data and tokenizer for ``cfg`` (``--threads`` applied)."""
    prep = prepare(cfg, tokenizer=tokenizer)
    if THREADS:
        torch.set_num_threads(THREADS)
    return prep


LEVER_SETS = {"default": [v for v in list(VARIANTS)[3:list(VARIANTS).index("no_cluster")]],
              "round2": ["cosine+baselines", "cosine+canary", "cosine+generated=1", "cosine+canary+generated=1",
                         "cosine+canary+consistency=0.1"]}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_config(preset: str, seed: int, trigger: dict, variant: str, model_sets: dict):
    if model_sets.get("model.base") == "scratch":  # the preset's own from-scratch model unless told otherwise
        model_sets = {**SCRATCH_MODELS.get(preset, {}), **model_sets}
    base = load_config(preset, {"seed": seed, **model_sets})
    over = {"seed": seed, "attack.family": trigger["family"], "attack.trigger": trigger["text"],
            "attack.position": trigger["position"], "defense.baselines": [], **model_sets}
    if "parts" in trigger:  # ctba / mtba: the parts are the trigger
        del over["attack.trigger"]
        over["attack.parts"] = trigger["parts"]
    if not variant.startswith("default"):  # levers are single changes from the paper's reference method
        over["defense.method"] = "locphylax"
    for k, v in VARIANTS[variant].items():
        if k == "baselines":
            over["defense.baselines"] = v
        elif k == "only":
            continue
        elif k in SCALED:
            over[k] = max(1, round(v * getattr(base.defense, k.split(".")[1])))
        else:
            over[k] = v
    return load_config(preset, over)


def model_key(cfg, stage: str) -> str:
    """The cache name of a clean model or victim: it depends only on the model, task and train
    sections and the seed (and, for a victim, the attack). Fields at their default are left out,
    so adding a config field whose default keeps the old behaviour invalidates no cached model."""
    parts = {"model": cfg.model.model_dump(exclude_defaults=True), "task": cfg.task.model_dump(exclude_defaults=True),
             "train": cfg.train.model_dump(exclude_defaults=True), "seed": cfg.seed, "key": 2}
    if stage == "victim":
        parts["attack"] = cfg.attack.model_dump(exclude_defaults=True)
    return f"{cfg.name}-{stage}-{_hash(parts)}"


class Models:
    """Clean models and victims, trained once and cached on disk (safetensors)."""

    def __init__(self):
        self.mem: dict[str, tuple] = {}

    def _train(self, cfg, stage: str, parent, tokenizer):
        prep = prepare_data(cfg, tokenizer=tokenizer)
        device = run_device(cfg)
        # as the pipeline builds them: the run's fresh model, or a copy of the cached parent
        lm = fresh_model(prep, device) if parent is None else as_lm(prep, copy.deepcopy(parent), device)
        train_owner_model(prep, lm, stage, owner_context(prep, stage, from_scratch=parent is None),
                          from_scratch=parent is None)
        return lm.model, prep.tokenizer

    def get(self, cfg, stage: str):
        """(model, tokenizer) for stage 'clean' or 'victim' of ``cfg``."""
        key = model_key(cfg, stage)
        if key in self.mem:
            return self.mem[key]
        folder = CACHE / "models" / key
        if (folder / "model.safetensors").is_file() and (folder / "tokenizer").is_dir():
            result = (M.load_checkpoint(folder, run_device(cfg)), M.load_tokenizer(str(folder / "tokenizer")))
        else:
            if stage == "clean":
                result = self._train(cfg, "clean", None, None)
            else:
                clean, tok = self.get(cfg, "clean")
                result = self._train(cfg, "victim", clean, tok)
            M.save_checkpoint(result[0], folder)  # replaces the folder, so the tokenizer goes in after
            M.save_tokenizer(result[1], folder / "tokenizer")
        self.mem = {k: v for k, v in self.mem.items() if "-clean-" in k}  # keep cleans, one victim
        self.mem[key] = result
        return result


def _scores(r: dict) -> dict:
    known = [v for k, v in r["asr"].items() if k != "unknown" and v is not None]
    return {"cacc": r["cacc"], "asr_unknown": r["asr"]["unknown"], "asr_raw_unknown": r["asr_raw"]["unknown"],
            "asr_known": statistics.fmean(known) if known else None}


TRIGGER_MAJOR = False  # --trigger-major: every seed of a trigger before the next trigger
CACHED_ONLY = False  # --cached-only: tables from the rows already computed, training nothing


def _cached_rows() -> dict[tuple, list[dict]]:
    """Every cached cell by (preset, model, seed, trigger, position, variant); the newest wins."""
    global _CACHED
    if _CACHED is None:
        _CACHED = {}
        for f in sorted((CACHE / "rows").glob("*.json"), key=lambda p: p.stat().st_mtime):
            cell = json.loads(f.read_text())
            if cell:
                r = cell[0]
                _CACHED[_cell_key(r)] = cell
    return _CACHED


_CACHED = None
PRIOR: dict[tuple, list[dict]] = {}  # --prior-runs: cells of committed runs CSVs, for cells the cache lacks


def _cell_key(r: dict) -> tuple:
    return (r["preset"], r["model"], r["seed"], r["trigger"], r["position"], r["variant"])


def _row_path(cfg, preset, seed, trigger, variant, model_sets) -> Path:
    key = _hash({"preset": preset, "seed": seed, "trigger": trigger, "variant": VARIANTS[variant],
                 "model_sets": model_sets, "cfg": cfg.model_dump(mode="json", exclude_defaults=True)})
    return CACHE / "rows" / f"{key}.json"


def run_cell(models: Models, preset: str, seed: int, trigger: dict, split: str, variant: str,
             model_sets: dict, model_tag: str) -> list[dict]:
    """All rows of one (preset, seed, trigger, variant): the victim and each method's two stages."""
    cfg = run_config(preset, seed, trigger, variant, model_sets)
    path = _row_path(cfg, preset, seed, trigger, variant, model_sets)
    if path.is_file():
        return json.loads(path.read_text())
    base = {"preset": preset, "model": model_tag, "seed": seed, "split": split, "family": trigger["family"],
            "trigger": trigger["text"], "position": trigger["position"], "variant": variant}
    if CACHED_ONLY:  # by content: keys of rows computed before a config field was added differ
        return _cached_rows().get(_cell_key(base)) or PRIOR.get(_cell_key(base), [])
    victim, tok = models.get(cfg, "victim")
    prep = prepare_data(cfg, tokenizer=tok)
    device = run_device(cfg)
    lm = as_lm(prep, victim, device)
    rows = [{**base, "method": "victim", "stage": "victim", "seconds": 0.0,
             **_scores(evaluate(lm, prep.task.template, prep.evalset, cfg.eval.batch_size, prep.max_length))}]
    for method in VARIANTS[variant].get("only") or ["locphylax", *cfg.defense.baselines]:
        lm = as_lm(prep, copy.deepcopy(victim), device)  # the cached victim is never trained
        t0 = [time.perf_counter()]

        def stage_row(record, _lm, method=method, t0=t0):
            rows.append({**base, "method": method, "stage": record["stage"],
                         "seconds": round(time.perf_counter() - t0[0], 2), **_scores(record["eval"])})
            t0[0] = time.perf_counter()

        # the pipeline's stages and seeds; ONION's stage 2 is judged on the filtered inputs, as in the pipeline
        run_method(method, lm, prep.defender, cfg.defense, method_context(prep), evalset=prep.evalset,
                   evaluate=lambda m, es: evaluate(m, prep.task.template, es, cfg.eval.batch_size, prep.max_length),
                   on_stage=stage_row)
    atomic_write_text(path, json.dumps(rows))
    return rows


# ----------------------------------------------------------------------------------------------
# Aggregation and output

def prior_cells(paths) -> dict[tuple, list[dict]]:
    """Cells of earlier runs by content key, rows kept in their order; a later file wins a key."""
    cells: dict[tuple, list[dict]] = {}
    for path in paths:
        file_cells: dict[tuple, list[dict]] = {}
        for r in read_runs_csv(path):
            file_cells.setdefault(_cell_key(r), []).append(r)
        cells.update(file_cells)
    return cells


def summarise(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """Mean ± sd over every row sharing ``by`` (seeds and triggers pooled), plus the victim's CACC
    on the same cells so the CACC change is a paired difference."""
    victim_cacc = {(r["preset"], r["model"], r["seed"], r["trigger"], r["position"]): r["cacc"]
                   for r in rows if r["method"] == "victim"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for k, sel in groups.items():
        entry = dict(zip(by, k))
        entry["n"] = len(sel)
        for m in METRICS:
            entry[f"{m}_mean"], entry[f"{m}_sd"] = mean_sd([r[m] for r in sel])
        d = [r["cacc"] - victim_cacc[(r["preset"], r["model"], r["seed"], r["trigger"], r["position"])] for r in sel]
        entry["dcacc_mean"], entry["dcacc_sd"] = mean_sd(d)
        entry["seconds_mean"] = statistics.fmean(r["seconds"] for r in sel)
        out.append(entry)
    return out


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def split_triggers(split: str) -> list[dict]:
    """The triggers of a split; ``table`` is the families x defenses table's: the first report
    trigger of each insertion family (word, phrase, long, char) and the four issue-6 families."""
    if split == "table":
        firsts = {}
        for t in GRID["report"]:
            firsts.setdefault(t["family"], t)
        return list(firsts.values()) + GRID["families"]
    return GRID[split]


def select_triggers(split: str, families=None, per_family: int | None = None, texts=None) -> list[dict]:
    out, seen = [], {}
    for t in split_triggers(split):
        if families is not None and t["family"] not in families:
            continue
        if texts is not None and t["text"] not in texts:
            continue
        seen[t["family"]] = seen.get(t["family"], 0) + 1
        if per_family is None or seen[t["family"]] <= per_family:
            out.append(t)
    return out


def train_victims(presets, seeds, split, model_sets: dict, families=None, per_family=None, texts=None) -> int:
    models = Models()
    for preset in presets:
        for seed in seeds:
            for trig in select_triggers(split, families, per_family, texts):
                t0 = time.perf_counter()
                models.get(run_config(preset, seed, trig, "ref", model_sets), "victim")
                print(f"victim {preset} s{seed} {trig['text'][:20]!r}@{trig['position']}: "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
    return 0


def run_grid(presets, seeds, split, variants, model_sets: dict, model_tag: str, families=None,
             per_family=None, texts=None) -> list[dict]:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    models = Models()
    triggers = select_triggers(split, families, per_family, texts)
    if not triggers:
        raise SystemExit(f"no trigger of split {split!r} matches families={families} triggers={texts}")
    rows = []
    total = len(presets) * len(seeds) * len(triggers) * len(variants)
    done = 0
    t_start = time.perf_counter()
    if TRIGGER_MAJOR:  # families round-robin, every seed of a trigger together: a cut-off run keeps both
        by_family: dict[str, list] = {}
        for t in triggers:
            by_family.setdefault(t["family"], []).append(t)
        rounds = max(len(v) for v in by_family.values())
        interleaved = [v[i] for i in range(rounds) for v in by_family.values() if i < len(v)]
        order = [(p, s, t) for p in presets for t in interleaved for s in seeds]
    else:
        order = [(p, s, t) for p in presets for s in seeds for t in triggers]
    for preset, seed, trig in order:
        for variant in variants:
            t0 = time.perf_counter()
            cell = run_cell(models, preset, seed, trig, split, variant, model_sets, model_tag)
            rows += cell
            done += 1
            if not cell:
                continue
            s2 = {r["method"]: r["asr_unknown"] for r in cell if r["stage"] == "stage2"}
            v = cell[0]
            print(f"[{done}/{total} {time.perf_counter() - t_start:6.0f}s] {preset} s{seed} {trig['family']}:"
                  f"{trig['text'][:18]!r}@{trig['position']} {variant}: victim {_f(v['cacc'])}/"
                  f"{_f(v['asr_unknown'])} -> " + " ".join(f"{m} {_f(a)}" for m, a in s2.items()) +
                  f" cacc {_f(min(r['cacc'] for r in cell))} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def _cell_is_cached(preset, seed, trigger, variant, model_sets) -> bool:
    try:
        return _row_path(run_config(preset, seed, trigger, variant, model_sets), preset, seed, trigger, variant,
                         model_sets).is_file()
    except Exception:  # an invalid cell is not cached; its task will fail and say why
        return False


def _ray_cell(job: dict, *_after) -> list[dict]:
    """One Ray task: the rows of one (preset, seed, trigger) for every variant, computed in a Ray
    worker process (one torch thread per CPU the task holds), cached on disk as they finish."""
    global THREADS
    THREADS = job["threads"]
    torch.set_num_threads(job["threads"])
    import transformers
    transformers.utils.logging.set_verbosity_error()
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{job['name']}.attempts").open("a") as f:  # how many times the task ran (retries)
        f.write(f"{os.getpid()}\n")
    models = Models()
    if job.get("clean_only"):
        models.get(run_config(job["preset"], job["seed"], job["trigger"], "ref", job["model_sets"]), "clean")
        return []
    return [r for v in job["variants"] for r in run_cell(models, job["preset"], job["seed"], job["trigger"],
                                                         job["split"], v, job["model_sets"], job["model_tag"])]


def _error_line(e: BaseException) -> str:
    """The line of an exception that says what went wrong (a ConfigError's field line, not Ray's frame)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("For further")]
    return (lines[-1] if lines else type(e).__name__)[:300]


def run_ray(args, presets, seeds, split, variants, model_sets: dict, model_tag: str) -> tuple[list[dict], list[dict]]:
    """The grid as Ray tasks: ``ray.init()`` on this machine (``--jobs`` CPUs, default all), or the
    cluster at ``--address``. Each (preset, seed) first trains its clean model in one task; the
    cells of that preset and seed then run as tasks that wait for it, each holding one CPU and,
    where the cluster has GPUs, ``--gpu-per-cell`` of one (so several cells share a GPU). A cell
    whose rows are all cached is read, not recomputed. A failing task is retried once
    (``max_retries=1``, exceptions included); a cell that fails twice is returned in the second
    list with its error, for the table to report."""
    import ray
    triggers = select_triggers(split, args.families, args.per_family, args.triggers)
    if not triggers:
        raise SystemExit(f"no trigger of split {split!r} matches families={args.families} triggers={args.triggers}")
    env = {"PYTHONPATH": str(ROOT),  # the workers import bench.collapse and locphylax_core from this checkout
           "LOCPHYLAX_BENCH_CACHE": str(CACHE), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # "local": a new instance of its own, even where another Ray cluster runs on this machine (a bare
    # ray.init() would join that one, and refuse num_cpus)
    init = {"address": args.address} if args.address else {"address": "local", "num_cpus": args.jobs or os.cpu_count()}
    ray.init(**init, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        gpu = (args.gpu_per_cell if args.gpu_per_cell is not None else 0.125) if gpus else 0
        task = ray.remote(num_cpus=1, num_gpus=gpu, max_retries=1, retry_exceptions=True)(_ray_cell)
        common = {"split": split, "variants": variants, "model_sets": model_sets, "model_tag": model_tag, "threads": 1}
        cells = [(p, s, i, t) for p in presets for s in seeds for i, t in enumerate(triggers)]
        todo = [c for c in cells if not all(_cell_is_cached(c[0], c[1], c[3], v, model_sets) for v in variants)]
        cleans = {}
        for p, s in dict.fromkeys((c[0], c[1]) for c in todo):
            first = next(c[3] for c in todo if c[0] == p and c[1] == s)
            cleans[(p, s)] = task.remote({**common, "name": f"clean-{p}-{s}", "preset": p, "seed": s,
                                          "trigger": first, "clean_only": True})
        running, rows, failed = {}, [], []
        for p, s, i, t in cells:
            if (p, s, i, t) in todo:  # the clean model's task is an argument: Ray runs the cell after it
                job = {**common, "name": f"cell-{p}-{s}-{i}", "preset": p, "seed": s, "trigger": t}
                running[task.remote(job, cleans[(p, s)])] = (p, s, i)
            else:
                rows += [r for v in variants for r in run_cell(Models(), p, s, t, split, v, model_sets, model_tag)]
        print(f"ray: {len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to run on "
              f"{ray.cluster_resources().get('CPU', 0):.0f} CPUs and {gpus:.0f} GPUs ({gpu} GPU per cell)", flush=True)
        t0 = time.perf_counter()
        pending = list(running)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            p, s, i = running[done[0]]
            t = triggers[i]
            try:
                cell = ray.get(done[0])
            except Exception as e:  # failed twice: reported, never dropped
                err = _error_line(getattr(e, "cause", None) or e)
                failed.append({"preset": p, "seed": s, "family": t["family"], "trigger": t["text"],
                               "position": t["position"], "error": err})
                print(f"[{time.perf_counter() - t0:6.0f}s] FAILED {p} s{s} {t['text'][:20]!r}: {err}", flush=True)
                continue
            print(f"[{time.perf_counter() - t0:6.0f}s] {len(running) - len(pending)}/{len(running)} {p} s{s} "
                  f"{t['family']}:{t['text'][:18]!r}@{t['position']}", flush=True)
            rows += cell
    finally:
        ray.shutdown()
    return rows, failed


def write_tables(tag: str, rows: list[dict], failed: list[dict]) -> None:
    """The CSVs of a run (every row, the summaries, the cells that failed twice) and docs/results.md."""
    write_csv(OUT / f"collapse_{tag}_runs.csv", rows)
    n_failed = {p: sum(f["preset"] == p for f in failed) for p in {r["preset"] for r in rows} | {f["preset"] for f in failed}}
    for name, by in [("summary", ("preset", "model", "variant", "method", "stage")),
                     ("by_family", ("preset", "model", "family", "variant", "method", "stage"))]:
        write_csv(OUT / f"collapse_{tag}_{name}.csv",
                  [{**r, "failed_cells": n_failed.get(r["preset"], 0)} for r in summarise(rows, by)])
    failed_csv = OUT / f"collapse_{tag}_failed.csv"
    if failed:
        write_csv(failed_csv, failed)
        print(f"{len(failed)} cell(s) failed twice; listed in {failed_csv} and in docs/results.md", flush=True)
    elif failed_csv.is_file():
        failed_csv.unlink()
    write_docs()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["report", "levers", "grid", "victims", "docs"])
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--split", choices=["tune", "report", "families", "table"], default=None)
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--families", nargs="+", default=None)
    ap.add_argument("--per-family", type=int, default=None,
                    help="only the first N triggers of each family (a smaller grid for the slower SST-2 preset)")
    ap.add_argument("--triggers", nargs="+", default=None,
                    help="only these trigger texts of the split (one cell per process, to spread a grid over cores)")
    ap.add_argument("--lever-set", choices=list(LEVER_SETS), default="default")
    ap.add_argument("--model-set", action="append", default=[], help="model/train override, e.g. model.n_layer=4")
    ap.add_argument("--model-lever", choices=list(MODEL_LEVERS), default=None,
                    help="a named model-level lever (its victims are trained separately)")
    ap.add_argument("--tag", default=None, help="name of this run's rows (CSV prefix)")
    ap.add_argument("--trigger-major", action="store_true",
                    help="run every seed of one trigger before the next (a cut-off run then has all seeds)")
    ap.add_argument("--cached-only", action="store_true",
                    help="write the tables from the rows already cached; cells not yet computed are left out")
    ap.add_argument("--prior-runs", nargs="+", type=Path, default=[],
                    help="with --cached-only: runs CSVs of earlier runs (bench/results/collapse_*_runs.csv) whose "
                         "cells count where the cache has none, so a table can grow on a machine without the cache")
    ap.add_argument("--jobs", type=int, default=None,
                    help="CPUs of the local Ray instance: cells (preset, seed, trigger) run at once, one torch "
                         "thread each (default: every core)")
    ap.add_argument("--address", default=None,
                    help="a running Ray cluster (ray://host:10001 or auto) instead of a local instance; every node "
                         "needs this repository at the same path, and LOCPHYLAX_BENCH_CACHE on a shared disk")
    ap.add_argument("--gpu-per-cell", type=float, default=None,
                    help="GPU share each cell requests where the cluster has GPUs (default 0.125: 8 cells per GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the preset's train.threads); 1 lets two benchmarks share 2 cores")
    args = ap.parse_args(argv)
    global THREADS, CACHED_ONLY, TRIGGER_MAJOR, PRIOR
    THREADS, CACHED_ONLY, TRIGGER_MAJOR = args.threads, args.cached_only, args.trigger_major
    if args.prior_runs and not args.cached_only:
        ap.error("--prior-runs needs --cached-only (a run that trains reads its cells from the cache)")
    missing = [str(p) for p in args.prior_runs if not p.is_file()]
    if missing:
        ap.error(f"--prior-runs: no such file {missing}")
    PRIOR = prior_cells(args.prior_runs)
    model_sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.model_set)}
    model_tag = ",".join(args.model_set) or "base"  # "base": the presets as shipped, on their pretrained bases
    if args.model_lever:
        model_sets, model_tag = {**MODEL_LEVERS[args.model_lever], **model_sets}, args.model_lever
    if args.what == "docs":
        write_docs()
        return 0
    if args.what == "report":
        presets, seeds, split = args.presets or ["demo", "sst2"], args.seeds or [0, 1, 2], args.split or "report"
        variants = args.variants or ["default+baselines", "ref"]
        tag = args.tag or ("report" if split == "report" else split) + "-" + "-".join(presets)
    elif args.what == "levers":
        presets, seeds, split = args.presets or ["demo"], args.seeds or [0, 1], args.split or "tune"
        variants = args.variants or (["ref+baselines", *LEVER_SETS["default"]] if args.lever_set == "default"
                                     else LEVER_SETS[args.lever_set])
        tag = args.tag or ("levers" if args.lever_set == "default" else f"levers-{args.lever_set}")
    else:
        presets, seeds, split = args.presets or ["demo"], args.seeds or [0], args.split or "tune"
        variants, tag = args.variants or ["ref"], args.tag or "grid"
    if args.what == "victims":  # train and cache the clean models and victims only
        return train_victims(presets, seeds, split, model_sets, args.families, args.per_family, args.triggers)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    failed: list[dict] = []
    if CACHED_ONLY:
        rows = run_grid(presets, seeds, split, variants, model_sets, model_tag, args.families, args.per_family,
                        args.triggers)
    else:
        rows, failed = run_ray(args, presets, seeds, split, variants, model_sets, model_tag)
    write_tables(tag, rows, failed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
