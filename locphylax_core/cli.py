"""The ``locphylax`` command: demo, run, resume, list, runs, show, cancel, corpus, pretrain."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from .analysis.run_analysis import analyze_run, export_figures
from .bases import BASES_DIR, listing as base_listing
from .config import load_config, override_notes
from .corpus import build_corpus
from .errors import Cancelled
from .errors import LocphylaxError, RunError
from .pipeline import resume_run, stage_specs, start_run
from .pretrain import load_pretrain_config, pretrain
from .registry import DEFENSES, PARADIGMS, TASKS
from .runs import INTERRUPTED, find_run, holder_pid, list_runs, os_problem, shown_status, wrapped_os_error

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# C0 and C1 control characters (ESC starts a terminal escape sequence), DEL, and the Unicode
# direction overrides that reorder what a terminal shows
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(value, lines: bool = False) -> str:
    """``value`` as text that is safe to print: every control character written visibly (``\\x1b``)
    instead of reaching the terminal. ``lines``: newlines and tabs stay (a multi-line message)."""
    return (_CONTROL_BUT_LINES if lines else _CONTROL).sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", str(value))


def cell(value):
    """A rich Text of ``value`` made :func:`plain`: printed as it is, never read as markup
    (``[/bold]``, ``[link=...]``) or emoji codes."""
    from rich.text import Text
    return Text(plain(value))


class _TqdmReporter:
    """A progress bar per stage (tqdm), on stderr."""

    def __init__(self):
        self.bar = None

    def stage_started(self, key, total_steps):
        from tqdm import tqdm
        self._close()
        self.bar = tqdm(total=total_steps, desc=f"{key:<22}", unit="step", leave=True,
                        dynamic_ncols=True, mininterval=0.5)

    def advance(self, n, logs):
        if self.bar is not None:
            self.bar.update(n)
            if "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def stage_finished(self, key, result):
        if self.bar is not None:
            asr = result["asr"].get("unknown")
            util = {"cacc": f"{result['cacc']:.3f}"} if result.get("cacc") is not None else \
                {"ppl": _ppl((result.get("utility") or {}).get("value"))}
            self.bar.set_postfix(**util, asr_unknown="n/a" if asr is None else f"{asr:.3f}")
        self._close()

    def message(self, text):
        print(text, file=sys.stderr)

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def quiet_libraries() -> None:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:5.1f}%"


def _ppl(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def results_table(summary: dict):
    """Rows: victim / Stage 1 / Stage 2 / each baseline; columns CACC, ASR unknown, t1, t2, seconds."""
    from rich.table import Table

    known = [k for k in summary.get("triggers", {}) if k != "unknown"] or ["t1", "t2"]
    # every name in it comes from the run's files: plain text (cell), never markup
    table = Table(title=cell(f"run {summary['run_id']} ({summary.get('preset')}, {summary.get('status')})"))
    perplexity = summary.get("utility_metric") == "perplexity"  # generative tasks: utility is perplexity
    utility = (lambda b: _ppl((b.get("utility") or {}).get("value"))) if perplexity else (lambda b: _pct(b["cacc"]))
    for col in ["", "perplexity" if perplexity else "CACC", "ASR unknown", *[f"ASR {k}" for k in known], "seconds"]:
        table.add_column(cell(col), justify="left" if not col else "right")
    secs = summary.get("seconds", {})
    rows = [("clean model", summary.get("clean_model"), None)] if perplexity else []  # the no-backdoor reference
    rows += [("victim", summary["stages"].get("victim"), secs.get("victim")),
             ("Stage 1", summary["stages"].get("stage1"), secs.get("stage1")),
             ("Stage 2 (Locphylax)", summary["stages"].get("stage2"), secs.get("stage2"))]
    rows += [(f"baseline: {name}", block, secs.get(name)) for name, block in summary.get("baselines", {}).items()]
    for name, block, sec in rows:
        if block is None:
            table.add_row(cell(name), "-", "-", *["-" for _ in known], "-")
            continue
        table.add_row(cell(name), utility(block), _pct(block["asr"].get("unknown")),
                      *[_pct(block["asr"].get(k)) for k in known], "-" if sec is None else f"{sec:.1f}")
    table.caption = ("ASR: headline (inputs the model answers correctly without the trigger); raw ASR is in "
                     f"summary.json. Total {secs.get('total', 0):.1f} s.")
    if perplexity:
        table.caption += (" Generative task: perplexity on held-out clean responses (lower is better); ASR by "
                          "the rule eval.asr_rule (locphylax_core/tasks/response.py).")
    return table


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    Console().print(results_table(summary))


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.set)
    for note in override_notes(cfg, args.set):
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        print(cfg.to_yaml())
        print("plan:")
        for s in stage_specs(cfg):
            print(f"  {s.key:<24} method={s.method:<15} from={s.parent or 'fresh model'}")
        print("config is valid (dry run: nothing trained, nothing written)")
        return 0
    quiet_libraries()
    main = _is_main_process()
    run, summary = start_run(cfg, runs_root=args.runs, reporter=_TqdmReporter() if main else None,
                             stop_after=args.stop_after)
    if not main:  # accelerate launch: rank 0 reports and analyses
        return 0
    _print_summary(summary)
    print(f"run folder: {plain(run.path)}")
    if summary.get("status") == "prepared":
        print(f"stopped after {args.stop_after}, as asked; `locphylax resume {run.run_id}` runs the rest")
        return 0
    if not args.no_analyze:
        _analyze(run)
    return 0


def _is_main_process() -> bool:
    """False on the ranks other than 0 of a multi-process launch (accelerate launch / torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def _end_distributed() -> None:
    if "torch.distributed" not in sys.modules:  # nothing trained here (and torch stays unimported)
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _analyze(run, export: str | None = None, heads: bool | None = None, casd: bool | None = None,
             layers: bool | None = None, methods=None) -> None:
    """None: as the run's config says (eval.analyses, eval.projections)."""
    t0 = time.perf_counter()
    result = analyze_run(run, methods=methods, heads=heads, casd=casd, layers=layers,
                         progress=lambda m: print(f"analysis: {m} ...", file=sys.stderr))
    agg = result["aggregation"]
    print(f"analysis written to {plain(run.analysis_path)} in {time.perf_counter() - t0:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in result['seconds'].items() if k != 'total')})")
    for key in ("victim", "stage1", "stage2"):
        if key in agg:
            score = agg[key].get("aggregation_score")
            print(f"  aggregation score {key:<7}: {'n/a' if score is None else f'{score:.3f}'}")
    if export is not None:
        files = export_figures(run, export or None)
        print(f"figures: {len(files)} files in {files[0].parent if files else export}")


def cmd_analyze(args) -> int:
    quiet_libraries()
    run = find_run(args.run, Path(args.runs))
    def part(skip: bool) -> bool | None:  # None: as the run's eval.analyses says
        return False if skip else (True if args.all else None)
    _analyze(run, export=args.export, heads=part(args.no_heads), casd=part(args.no_casd), layers=part(args.no_layers),
             methods=["pca", "tsne", "umap"] if args.all else None)
    return 0


def cmd_demo(args) -> int:
    args.config = "demo"
    args.dry_run = getattr(args, "dry_run", False)
    return cmd_run(args)


def cmd_resume(args) -> int:
    quiet_libraries()
    run = find_run(args.run, Path(args.runs))
    main = _is_main_process()
    summary = resume_run(run, reporter=_TqdmReporter() if main else None)
    if not main:
        return 0
    _print_summary(summary)
    if not args.no_analyze:
        _analyze(run)
    return 0


def cmd_runs(args) -> int:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=cell(f"runs in {args.runs}"))
    for col in ("run id", "preset", "status", "finished stages"):
        table.add_column(col)
    n = 0
    for info in list_runs(Path(args.runs)):  # folder names and state.json: plain text, never markup
        status = shown_status(Path(info["path"]), info["status"])
        table.add_row(cell(info["run_id"]), cell(info["preset"]), cell(status), str(len(info["finished"])))
        if status == INTERRUPTED:
            table.caption = (f"{INTERRUPTED}: the run's process ended without a word (killed); "
                             "`locphylax resume RUN` continues it")
        n += 1
    Console().print(table if n else cell(f"no runs in {args.runs}"))
    return 0


def registry_tables():
    """One table per registry (tasks, attack paradigms, defenses): what `--set` and the app accept."""
    from rich.table import Table


    def options(entry) -> str:
        cls = entry.options
        return ", ".join(f"{n}={f.default!r}" for n, f in cls.model_fields.items()) if cls is not None else "-"

    tables = []
    for title, reg, kind_of in (("tasks (task.name)", TASKS, lambda e: e.impl.kind.name),
                                ("attack paradigms (attack.paradigm)", PARADIGMS, lambda e: "-"),
                                ("defenses (defense.method: locphylax; defense.baselines: the others; options: defense.options.NAME)", DEFENSES,
                                 lambda e: e.kind or "-")):
        table = Table(title=title)
        for col in ("name", "label", "kind", "options"):
            table.add_column(col)
        for e in reg:
            table.add_row(cell(e.name), cell(e.label), cell(kind_of(e)), cell(options(e)))
        tables.append(table)
    return tables


def bases_table():
    """The bases ``model.base`` names: shipped ones and packaged ones (converted on first use)."""
    from rich.table import Table
    table = Table(title="bases (model.base; or a folder written by `locphylax pretrain`, or scratch)")
    for col in ("name", "kind", "shape", "parameters", "source"):
        table.add_column(col)
    for row in base_listing():
        s = row["shape"]
        kv = f", {s['n_kv_head']} kv" if s.get("n_kv_head") else ""
        shape = (f"{s['arch']}, {s['n_layer']} x {s['n_embd']}, {s['n_head']} heads{kv}, {s['n_positions']} positions, "
                 f"vocab {s['vocab_size']:,}")
        params = f"{row['parameters']:,}" if isinstance(row.get("parameters"), int) else "-"
        table.add_row(cell(row["name"]), cell(row["kind"]), cell(shape), params, cell(row["source"]))
    return table


def cmd_list(args) -> int:
    from rich.console import Console
    console = Console()
    for table in registry_tables():
        console.print(table)
    console.print(bases_table())
    return 0


def cmd_show(args) -> int:
    run = find_run(args.run, Path(args.runs))
    summary = run.read_summary()
    if args.json:
        import json
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


def cmd_cancel(args) -> int:
    root = Path(args.runs)
    run = find_run(args.run, root)
    if not run.is_run():
        raise RunError(f"{run.path} is not a run folder (it has no config.yaml and state.json); nothing to cancel")
    if root.resolve() not in run.path.resolve().parents:
        raise RunError(f"{run.path} is not in the runs folder {root}; pass that folder with --runs")
    if holder_pid(run.path) is None:
        status = run.read_state().get("status")
        raise RunError(f"run {run.run_id} is not running (no process holds it; its status is {str(status)[:40]!r}); "
                       f"nothing to cancel. `locphylax resume {run.run_id}` continues it")
    run.cancel_file.touch()
    print(plain(f"asked {run.run_id} to stop after its current step; `locphylax resume {run.run_id}` continues it"))
    return 0


def cmd_corpus(args) -> int:
    out = Path(args.out)
    t0 = time.perf_counter()
    manifest = build_corpus(out, args.sources, data_root=Path(args.data),
                            progress=lambda name, n: print(f"  {name}: {n:,} texts", file=sys.stderr))
    for src in manifest["sources"]:
        print(f"{src['name']:<11} {src['texts']:>9,} texts {src['words']:>11,} words  "
              f"({src['duplicates_dropped']:,} duplicates, {src['test_overlap_dropped']:,} overlapping a test split "
              f"dropped)  {src['licence']}")
    f = manifest["files"]
    print(f"corpus {out}: train {f['train.txt']['words']:,} words, held-out {f['heldout.txt']['words']:,} words "
          f"({time.perf_counter() - t0:.0f} s); manifest {out / 'manifest.json'}")
    return 0


class _PretrainReporter(_TqdmReporter):
    """The run reporter's progress bar; pretraining has no per-stage evaluation to print."""

    def stage_finished(self, key, result):
        self._close()

    def message(self, text):
        from tqdm import tqdm
        tqdm.write(text, file=sys.stderr)


def cmd_pretrain(args) -> int:
    over = list(args.set) + [f"size={args.size}"] + ([f"corpus={args.corpus}"] if args.corpus else []) + \
        ([f"out={args.out}"] if args.out else [])
    cfg = load_pretrain_config(over)
    if args.cancel:
        (cfg.out_dir / "CANCEL").parent.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "CANCEL").touch()
        print(f"asked the pretraining in {cfg.out_dir} to stop after its current step (a checkpoint is written); "
              "the same command continues it")
        return 0
    if args.dry_run:
        print(cfg.model_dump_json(indent=2))
        return 0
    quiet_libraries()
    (cfg.out_dir / "CANCEL").unlink(missing_ok=True)
    command = "locphylax pretrain " + " ".join(a for a in sys.argv[2:] if a != "--ship") if len(sys.argv) > 2 else None
    main = _is_main_process()
    card = pretrain(cfg, _PretrainReporter() if main else None, command=command)
    if main and args.ship:
        import shutil
        dest = BASES_DIR / cfg.size
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(cfg.out_dir / "base", dest)
        print(f"shipped as model.base={cfg.size}: {dest}")
    if main:
        print(f"base {cfg.out_dir / 'base'}: {card['steps']:,} steps, {card['tokens_seen']:,} tokens, held-out "
              f"perplexity {card['heldout_ppl']:.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="locphylax", description="Backdoor Collapse: build a backdoored model, "
                                "run the defense and its baselines, and compare them.")
    p.add_argument("--runs", default=os.environ.get("LOCPHYLAX_RUNS", "runs"), help="run store folder (default: runs)")
    sub = p.add_subparsers(dest="command", required=True)

    def add_set(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set attack.family=phrase (repeatable)")
        sp.add_argument("--dry-run", action="store_true", help="validate and print the plan, train nothing")
        sp.add_argument("--no-analyze", action="store_true", help="skip the analyses after the run (see `analyze`)")
        sp.add_argument("--stop-after", metavar="STAGE", default=None,
                        help="run only this stage and the stages it starts from (e.g. victim, or clean_ft/stage2), "
                             "then stop; `resume` runs the rest")

    sp = sub.add_parser("demo", help="the whole pipeline on the embedded default (about 3 minutes on 2 CPU cores)")
    add_set(sp)
    sp.set_defaults(fn=cmd_demo)
    sp = sub.add_parser("run", help="run a preset (demo, sst2, ...) or a YAML config")
    sp.add_argument("config", help="preset name or path to a YAML file")
    add_set(sp)
    sp.set_defaults(fn=cmd_run)
    sp = sub.add_parser("resume", help="continue a killed or cancelled run from its last finished stage")
    sp.add_argument("run", help="run id, id prefix or folder")
    sp.add_argument("--no-analyze", action="store_true", help="skip the analyses after the run")
    sp.set_defaults(fn=cmd_resume)
    sp = sub.add_parser("list", help="the registered tasks, attack paradigms and defenses, and the bases")
    sp.set_defaults(fn=cmd_list)
    sp = sub.add_parser("runs", help="list runs")
    sp.set_defaults(fn=cmd_runs)
    sp = sub.add_parser("show", help="show a run's results table")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true", help="print summary.json")
    sp.set_defaults(fn=cmd_show)
    sp = sub.add_parser("analyze", help="compute the aggregation, head-ablation, CASD, layer (logit lens, patching, salience) and projection analyses")
    sp.add_argument("run")
    sp.add_argument("--all", action="store_true",
                    help="every projection and analysis, also those the run's eval.projections / eval.analyses leave out")
    sp.add_argument("--no-heads", action="store_true", help="skip the head-ablation sweep")
    sp.add_argument("--no-casd", action="store_true", help="skip CASD")
    sp.add_argument("--no-layers", action="store_true",
                    help="skip the logit lens, activation patching, salience and trigger localisation")
    sp.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                    help="also write every figure as HTML + CSV (default folder: RUN/analysis/figures)")
    sp.set_defaults(fn=cmd_analyze)
    sp = sub.add_parser("corpus", help="build the pretraining corpus from Debian's English text packages and the "
                        "tasks' training splits (make corpus installs the packages)")
    sp.add_argument("--out", default="corpus", help="output folder (default: corpus)")
    sp.add_argument("--sources", nargs="+", default=None, help="a subset of the sources (default: all)")
    sp.add_argument("--data", default="../shared/data", help="the shared data folder (default: ../shared/data)")
    sp.set_defaults(fn=cmd_corpus)
    sp = sub.add_parser("pretrain", help="pretrain a base language model on the corpus (resumable: run it again "
                        "to continue)")
    sp.add_argument("--size", default="small",
                    help="a recipe: small (the shipped base) or medium (4 x 256, 256 positions; not shipped)")
    sp.add_argument("--corpus", default=None, help="corpus folder (default: corpus)")
    sp.add_argument("--out", default=None, help="output folder (default: pretrain/<size>)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set steps=2000 --set device=cuda (repeatable)")
    sp.add_argument("--ship", action="store_true",
                    help="when done, copy the base into locphylax_core/bases/<size> (the shipped base)")
    sp.add_argument("--cancel", action="store_true", help="ask a running pretraining of these settings to stop")
    sp.add_argument("--dry-run", action="store_true", help="print the settings and stop")
    sp.set_defaults(fn=cmd_pretrain)
    sp = sub.add_parser("cancel", help="ask a running run to stop (it stays resumable)")
    sp.add_argument("run")
    sp.set_defaults(fn=cmd_cancel)
    return p


def _sigterm(_signo, _frame):
    # a SIGTERM (kill, a scheduler's stop) ends a run like Ctrl-C: it is marked cancelled, resumable
    raise KeyboardInterrupt("stopped by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if args.command in ("run", "demo", "resume", "analyze", "pretrain") and \
            threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return args.fn(args)
    except LocphylaxError as e:
        print(f"error: {plain(e, lines=True)}", file=sys.stderr)  # it may name a run's folder or values
        return 2
    except (Cancelled, KeyboardInterrupt) as e:
        print(f"stopped: {plain(e or 'interrupted', lines=True)}. A run keeps its finished stages; `locphylax "
              "resume` continues it.", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused something no check above foresaw: one line, no traceback
        print(f"error: {plain(os_problem(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # the same refusal reported in a library's own type (safetensors, on a full disk)
        os_error = wrapped_os_error(e)
        if os_error is None:
            raise
        print(f"error: {os_problem(os_error)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _end_distributed()


if __name__ == "__main__":
    sys.exit(main())
