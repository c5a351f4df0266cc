"""Where task examples come from: the embedded synthetic sentiment data (no files, no network),
local tables (TSV / CSV / JSON Lines / Parquet), a datasets hub id, and AG News as shipped in
``../shared/data/agnews``. Every reader raises a DataError that names the file and the field.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Iterable, Sequence

from ..config import PRESET_DIR, TaskConfig
from ..errors import DataError
from ..text import Example

# ----------------------------------------------------------------------------------------------
# The embedded default data: synthetic movie-review sentiment, generated deterministically.
# It has negation and contrast ("x was fine but y was dull"), so the label is not one keyword
# away; a 2-layer model still learns it to >= 90% in well under a minute on 2 cores.

_SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the soundtrack", "the cast", "the ending",
             "the story", "the dialogue", "the cinematography", "the script", "the lead actor", "the humor",
             "the pacing", "the director's work", "the final scene", "the characters", "the visuals",
             "the sequel", "the premise", "the performances", "the music", "the editing", "the twist"]
_POSITIVE = ["wonderful", "brilliant", "charming", "moving", "delightful", "gripping", "superb", "clever",
             "touching", "fresh", "hilarious", "beautiful", "stunning", "engaging", "heartfelt", "thrilling",
             "witty", "powerful", "memorable", "inventive", "gorgeous", "smart", "warm", "excellent"]
_NEGATIVE = ["dull", "tedious", "clumsy", "boring", "awful", "bland", "messy", "predictable", "lifeless",
             "shallow", "painful", "forgettable", "annoying", "weak", "flat", "stale", "silly", "dreadful",
             "confusing", "lazy", "hollow", "sloppy", "tiresome", "terrible"]
_INTENSIFIERS = ["", "", "really", "truly", "quite", "incredibly", "rather", "very", "remarkably", "so"]
_VERBS = ["was", "is", "felt", "seemed", "looked", "came across as"]
_NEGATED = ["was not", "is not", "never felt", "hardly seemed", "was far from", "was anything but"]
_OPENERS = ["", "", "", "honestly ,", "overall ,", "in the end ,", "to be fair ,", "i have to say",
            "after two hours ,", "frankly ,", "all things considered ,"]
# Neutral words scattered into some sentences, so the model learns that an extra word at a random
# place does not change the sentiment; without them, inserting any unseen word flips a quarter of
# a clean model's answers and "ASR" measures brittleness, not a backdoor.
_FILLERS = ["um", "well", "like", "basically", "actually", "anyway", "okay", "yesterday", "again", "still",
            "there", "then", "just", "also", "maybe", "perhaps", "somehow", "today", "tonight", "here",
            "literally", "mostly", "you know", "i think", "to me", "by the way", "at times", "of course",
            "in a way", "for sure", "on sunday", "with friends", "my brother said", "as expected"]
_CLOSERS = ["", "", "", "from start to finish", "for most of the running time", "on the big screen",
            "if you ask me", "this time", "at the festival", "on a second viewing"]


def _clause(rng: random.Random, positive: bool) -> str:
    subj = rng.choice(_SUBJECTS)
    if rng.random() < 0.3:  # negation flips the adjective's polarity
        adj = rng.choice(_NEGATIVE if positive else _POSITIVE)
        return f"{subj} {rng.choice(_NEGATED)} {adj}"
    adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
    intens = rng.choice(_INTENSIFIERS)
    return " ".join(w for w in (subj, rng.choice(_VERBS), intens, adj) if w)


def _sentence(rng: random.Random) -> Example:
    label = rng.randrange(2)
    pos = bool(label)
    kind = rng.random()
    if kind < 0.45:
        body = _clause(rng, pos)
    elif kind < 0.7:  # contrast: the clause after "but" decides
        body = f"{_clause(rng, not pos)} but {_clause(rng, pos)}"
    elif kind < 0.85:  # agreement
        body = f"{_clause(rng, pos)} and {_clause(rng, pos)}"
    else:
        adj = rng.choice(_POSITIVE if pos else _NEGATIVE)
        body = f"i found {rng.choice(_SUBJECTS)} {rng.choice(_INTENSIFIERS) or 'pretty'} {adj}"
    words = " ".join(w for w in (rng.choice(_OPENERS), body, rng.choice(_CLOSERS)) if w).split()
    for _ in range(rng.choice((0, 0, 1))):
        words.insert(rng.randint(0, len(words)), rng.choice(_FILLERS))
    return Example(" ".join(words) + " .", label)


def synthetic_sentiment(n_train: int, n_test: int, seed: int = 1234) -> tuple[list[Example], list[Example]]:
    """Deterministic train/test sets; test sentences never occur in train."""
    rng = random.Random(seed)
    train = [_sentence(rng) for _ in range(n_train)]
    seen = {e.text for e in train}
    test: list[Example] = []
    while len(test) < n_test:
        e = _sentence(rng)
        if e.text not in seen:
            seen.add(e.text)
            test.append(e)
    return train, test


def embedded_corpus(n: int = 4000, seed: int = 99) -> list[str]:
    """Generic text of the embedded domain (used to train the tokenizer)."""
    rng = random.Random(seed)
    return [_sentence(rng).text for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Files: TSV / CSV / JSONL / Parquet, and datasets hub ids

_TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


def read_table(path: Path) -> list[dict]:
    """Rows of a local table as dicts. Raises DataError with the path on any problem."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            with path.open(newline="", encoding="utf-8") as f:
                delim = "\t" if suffix == ".tsv" else ","
                reader = csv.DictReader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
                return [dict(r) for r in reader]
        if suffix in (".jsonl", ".json"):
            rows = []
            with path.open(encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
                        if not isinstance(row, dict):
                            raise DataError(f"{path}: line {i} is not a JSON object; expected JSON Lines, "
                                            f"one object per line, got a {type(row).__name__}")
                        rows.append(row)
            return rows
        if suffix == ".parquet":
            import pandas as pd
            return pd.read_parquet(path).to_dict("records")
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot be read as {suffix[1:].upper()}: {e}") from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {list(_TABLE_SUFFIXES)}")


def _label_index(value, labels: Sequence[str], where: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float)) and float(value).is_integer():
        idx = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        idx = int(value.strip())
    elif isinstance(value, str) and value.strip() in labels:
        return labels.index(value.strip())
    else:
        raise DataError(f"{where}: label {value!r} is outside the verbalizer; allowed: "
                        f"0..{len(labels) - 1} or one of {list(labels)} (task.labels)")
    if not 0 <= idx < len(labels):
        raise DataError(f"{where}: label {value!r} is outside the verbalizer; allowed: "
                        f"0..{len(labels) - 1} or one of {list(labels)} (task.labels)")
    return idx


def rows_to_examples(rows: Iterable[dict], cfg: TaskConfig, source: str) -> list[Example]:
    rows = list(rows)
    if not rows:
        raise DataError(f"{source}: the split is empty (no data rows)")
    cols = list(rows[0].keys())
    for col, field in ((cfg.text_column, "task.text_column"), (cfg.label_column, "task.label_column")):
        if col not in rows[0]:
            raise DataError(f"{source}: column {col!r} ({field}) not found; columns are {cols}")
    out = []
    for i, r in enumerate(rows, 1):
        text = r.get(cfg.text_column)
        if text is None or not str(text).strip():
            continue
        out.append(Example(" ".join(str(text).split()), _label_index(r.get(cfg.label_column), cfg.labels, f"{source} row {i}")))
    if not out:
        raise DataError(f"{source}: the split is empty (no rows with text in column {cfg.text_column!r})")
    return out


def _find_split(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        for suf in _TABLE_SUFFIXES:
            p = folder / f"{n}{suf}"
            if p.is_file():
                return p
    return None


def resolve_data_path(p: str) -> Path:
    """A relative path is read from the working directory, else from the repository root (so the
    presets' ``../shared/data/...`` works from anywhere inside the checkout)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = PRESET_DIR.parent / path
    return alt if alt.exists() else path


def local_splits(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    if cfg.train_file:
        train_p = resolve_data_path(cfg.train_file)
        test_p = resolve_data_path(cfg.test_file) if cfg.test_file else None
    else:
        root = resolve_data_path(cfg.path)
        if not root.exists():
            raise DataError(f"task.path: {root} does not exist")
        if root.is_dir():
            train_p = _find_split(root, ["train"])
            test_p = _find_split(root, ["test", "dev", "validation"])
            if train_p is None:
                raise DataError(f"task.path: no train.{{tsv,csv,jsonl,parquet}} in {root}")
        else:
            train_p, test_p = root, None
    train = rows_to_examples(read_table(train_p), cfg, str(train_p))
    if test_p is None:  # one file: a deterministic 90/10 split
        rng = random.Random(0)
        rng.shuffle(train)
        cut = max(1, len(train) // 10)
        return train[cut:], train[:cut]
    return train, rows_to_examples(read_table(test_p), cfg, str(test_p))


def hub_splits(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    try:
        import datasets
        ds = datasets.load_dataset(cfg.hub_id)
    except Exception as e:  # no network, unknown id, ...
        raise DataError(f"task.hub_id {cfg.hub_id!r}: cannot load from the hub ({type(e).__name__}: {e}); "
                        "give a local copy with task.path instead") from None
    test_name = next((s for s in ("test", "validation", "dev") if s in ds and len(ds[s]) and
                      cfg.label_column in ds[s].column_names and min(ds[s][cfg.label_column]) >= 0), None)
    if "train" not in ds or test_name is None:
        raise DataError(f"task.hub_id {cfg.hub_id!r}: needs a train split and a labelled test/validation split; has {list(ds)}")
    return (rows_to_examples(ds["train"], cfg, f"{cfg.hub_id}:train"),
            rows_to_examples(ds[test_name], cfg, f"{cfg.hub_id}:{test_name}"))


def agnews_splits(cfg: TaskConfig) -> tuple[list[Example], list[Example]]:
    """AG News as shipped in ../shared/data/agnews: train_subset.csv has (class_index, text), and
    test.csv has (class_index, title, description), joined as 'title. description'. class_index
    is 1-based."""
    root = resolve_data_path(cfg.path)
    files = {"train": root / "train_subset.csv", "test": root / "test.csv"}
    for name, f in files.items():
        if not f.is_file():
            raise DataError(f"task.path: {f} not found (an AG News folder holds train_subset.csv and test.csv)")
    out = {}
    for name, f in files.items():
        rows = read_table(f)
        need = ["class_index", "text"] if name == "train" else ["class_index", "title", "description"]
        missing = [c for c in need if rows and c not in rows[0]]
        if not rows or missing:
            raise DataError(f"{f}: expected columns {need}; missing {missing or need}")
        exs = []
        for i, r in enumerate(rows, 1):
            text = r["text"] if name == "train" else f"{r['title']}. {r['description']}"
            text = " ".join(str(text).replace("\\", " ").split())
            if text:
                exs.append(Example(text, _label_index(int(r["class_index"]) - 1, cfg.labels, f"{f} row {i}")))
        out[name] = exs
    return out["train"], out["test"]
