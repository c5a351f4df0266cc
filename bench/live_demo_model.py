"""Build the shipped clean model of the live demo: `locphylax_core/bases/demo_clean`.

The live demo (configs/live.yaml, the app's Live demo page) must not train anything from zero at
click time, so it starts from this folder with ``train.clean_steps: 0``: the `demo` preset's clean
model (the pretrained base `small` fine-tuned for 400 clean steps on the synthetic sentiment data,
seed 0), exactly as `make demo` trains it, stored in float32 with a card (base.json) that lists the
sha256 of every file, how it was trained and its clean accuracy.

    python -m bench.live_demo_model            # rebuild it (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from locphylax_core import bases, load_config  # noqa: E402
from locphylax_core import model as M  # noqa: E402
from locphylax_core.evaluation import evaluate  # noqa: E402
from locphylax_core.experiment import fresh_model, owner_context, prepare, train_owner_model  # noqa: E402
from locphylax_core.runs import atomic_write_json, atomic_write_text, file_sha256  # noqa: E402

NAME = "demo_clean"


def card_text(card: dict) -> str:
    return f"""# Locphylax base `{card['name']}`: the live demo's clean model

The `demo` preset's clean model: the pretrained base `{card['from_base']}` fine-tuned for
{card['steps']} steps on the synthetic movie-review sentiment task (seed {card['seed']}), exactly as
`locphylax demo` trains its `clean` stage. Clean accuracy on the demo's {card['n_test']} test
sentences: **{100 * card['cacc']:.1f}%**. It carries no backdoor.

The live demo (`configs/live.yaml`) starts from it with `train.clean_steps: 0`, so one click on the
app's Live demo page trains only the victim and the defense. Weights in {card['dtype']} (loaded as
they are), {card['parameters']:,} parameters; trained in {card['seconds']:.1f} s on {card['device']}
(torch {card['torch']}).

Rebuild: `{card['command']}`. The same command on the same kind of machine gives the same weights.

## Files (sha256; checked every time the base is loaded)

""" + "\n".join(f"    {h}  {n}" for n, h in card["files"].items()) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(bases.BASES_DIR / NAME))
    args = ap.parse_args(argv)
    cfg = load_config("demo")
    prep = prepare(cfg)
    t0 = time.perf_counter()
    lm = fresh_model(prep, torch.device("cpu"))
    train_owner_model(prep, lm, "clean", owner_context(prep, "clean", from_scratch=True), from_scratch=True)
    seconds = time.perf_counter() - t0
    r = evaluate(lm, prep.task.template, prep.evalset, cfg.eval.batch_size, prep.max_length)
    cpu = platform.processor() or platform.machine()

    def write(tmp: Path) -> None:
        lm.model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        prep.tokenizer.save_pretrained(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        card = {"schema": 1, "name": NAME, "role": "clean", "task": cfg.task.name, "from_base": cfg.model.base,
                "arch": cfg.model.arch, "shape": {k: getattr(cfg.model, k) for k in ("n_layer", "n_embd", "n_head",
                                                                                        "n_positions")},
                "vocab_size": len(prep.tokenizer), "parameters": M.count_parameters(lm.model), "dtype": "float32",
                "steps": cfg.train.clean_steps, "seed": cfg.seed, "cacc": r["cacc"], "n_test": len(prep.task.test),
                "seconds": round(seconds, 1), "device": f"{cpu} ({torch.get_num_threads()} threads)",
                "torch": torch.__version__, "command": "python -m bench.live_demo_model", "files": files}
        atomic_write_json(tmp / bases.CARD, card)
        atomic_write_text(tmp / "README.md", card_text(card))

    M.write_folder_atomically(Path(args.out), write)
    print(f"{args.out}: clean CACC {100 * r['cacc']:.1f}%, trained in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
