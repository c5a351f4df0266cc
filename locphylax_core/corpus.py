"""The pretraining corpus: cleaned, de-duplicated English from Debian's text packages and the
training splits of the tasks, with a held-out 1% and a manifest.

Each source is one :class:`CorpusSource` (where its files lie, which package installs them, its
licence and a reader that yields clean texts), registered in :data:`SOURCES`. The build is
deterministic: sources are read in a fixed order, a text is kept the first time its normalised
form is seen, and whether it is held out depends only on a hash of that form.

No dev or test split of any task enters the corpus. The files the tasks evaluate on are never
read as sources, and every kept text is also checked against all of them (:data:`TEST_SPLITS`):
a text that equals a test text, or shares a run of :data:`NGRAM` words with one, is dropped and
counted in the manifest.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from .config import PRESET_DIR
from .errors import DataError
from .tasks import synthetic_sentiment
from .runs import atomic_write_json, atomic_write_text, file_sha256

NGRAM = 13  # shared-word-run length that counts as contamination (GPT-3's decontamination rule)
HELDOUT_PERCENT = 1
MIN_WORDS = 3


def normalise(text: str) -> str:
    """One line of running text: NFKC, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def match_key(text: str) -> list[str]:
    """The words a text is compared by (dedup and decontamination): lower-case alphanumeric runs."""
    return re.findall(r"[a-z0-9]+", text.lower())


MARKUP = "\\|{}[]<>=\ufffd"


def _plausible(text: str, min_words: int = MIN_WORDS, forbidden: str = MARKUP) -> bool:
    """Enough words, mostly letters, no markup left and balanced double quotes."""
    if len(text.split()) < min_words or any(c in text for c in forbidden) or text.count('"') % 2:
        return False
    letters = sum(c.isalpha() for c in text)
    return letters >= 0.6 * len(text.replace(" ", ""))


# ----------------------------------------------------------------------------------------------
# GCIDE (dictd format: gcide.index lists headword, offset, length in dictd's base64)

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SOURCE_MARK = re.compile(r"^\s*\[(?:\d{4} Webster|Webster \d{4}[^\]]*|WordNet[^\]]*|PJC|RDH|DA|Century[^\]]*|"
                          r"Chambers[^\]]*|[A-Z][A-Za-z. ]{0,30}\d{4}[^\]]*)\]\s*$")
_HEAD = re.compile(r"^[^\\\n]*\\[^\\]*\\,?\s*")  # "Affect \Af*fect"\, " : headword and pronunciation
_POS = re.compile(r"^(?:(?:[a-z]{1,5}\.|&)\s*)+,?\s*")  # "v. t.", "n.", "a. & n."
_FIELD_LABEL = re.compile(r"\((?:[A-Z][A-Za-z]*\.?\s*(?:&\s*)?)+\)\s*")  # "(Bot.)", "(Zool. & Bot.)"
# "--Milton.", "--Sir T. Browne.", "--3. John 2." (a dash used as punctuation has spaces round it)
_ATTRIBUTION = re.compile(r"\s*--(?=\S).*$")
# an unknown character (GCIDE writes "?" for letters it cannot encode, "[Gr. ? in two]")
_UNKNOWN_CHAR = re.compile(r"(?:^|\s)\?|\w\?\w")
_SENSE = re.compile(r"^(?:\d+\.\s*|\([a-z]\)\s*)+")


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def _strip_brackets(text: str) -> str:
    prev = None
    while prev != text:  # innermost first: "[OE. aferen, AS. [=a]f?ran.]"
        prev, text = text, re.sub(r"\[[^\[\]]*\]", " ", text)
    return text


def _unbrace(text: str) -> str:
    """``{Di*chot"o*my}`` -> ``Dichotomy``: a cross-reference, its accent marks removed."""
    return re.sub(r"\{([^{}]*)\}", lambda m: re.sub(r"[*\"`]", "", m.group(1)), text)


def clean_gcide_entry(entry: str) -> list[str]:
    """The texts of one dictionary entry: its definitions and quotations, one text each, without
    the headword, pronunciation, part of speech, etymology, field labels, sense numbers, source
    marks, attributions and cross-reference braces."""
    paragraphs, cur = [], []
    for line in entry.splitlines():
        if not line.strip() or _SOURCE_MARK.match(line):
            if cur:
                paragraphs.append(" ".join(cur))
            cur = []
        else:
            cur.append(line.strip())
    if cur:
        paragraphs.append(" ".join(cur))
    out = []
    for i, p in enumerate(paragraphs):
        if i == 0:
            p = _HEAD.sub("", p, count=1)
            p = _strip_brackets(p)
            p = _POS.sub("", p.strip())
        p = _strip_brackets(p)
        if re.match(r"^(?:Syn\.|Syn:|Usage:)", p):
            continue
        p = re.sub(r"^Note:\s*", "", p)
        p = re.split(r"\s--\s*\{", p)[0]  # " -- {Di*chot"o*mous*ly}, adv.": derived forms
        p = _ATTRIBUTION.sub("", p)
        p = _FIELD_LABEL.sub("", p)
        p = _SENSE.sub("", p.strip())
        p = _unbrace(p)
        p = normalise(p.replace(" ,", ",").replace(" ;", ";").replace(" .", "."))
        if _plausible(p, 4, MARKUP + "*") and not _UNKNOWN_CHAR.search(p):
            out.append(p)
    return out


def read_gcide(root: Path) -> Iterator[str]:
    data, index = root / "usr/share/dictd/gcide.dict.dz", root / "usr/share/dictd/gcide.index"
    with gzip.open(data, "rb") as f:  # dictzip is gzip with an index of its own in the header
        raw = f.read()
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            spans.add((_b64(parts[1]), _b64(parts[2])))
    for off, length in sorted(spans):  # several headwords may share one entry
        yield from clean_gcide_entry(raw[off:off + length].decode("utf-8", errors="replace"))


# ----------------------------------------------------------------------------------------------
# WordNet (data.noun etc.: "... | gloss; "example"; "example"")


def clean_wordnet_gloss(gloss: str) -> list[str]:
    examples = [normalise(e) for e in re.findall(r'"([^"]+)"', gloss)]
    definition = normalise(re.sub(r'"[^"]*"', " ", gloss).strip(" ;"))
    definition = re.sub(r"(\s*;)+\s*$", "", definition)
    return [t for t in [definition, *examples] if _plausible(t)]


def read_wordnet(root: Path) -> Iterator[str]:
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / f"usr/share/wordnet/data.{pos}"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header
                continue
            yield from clean_wordnet_gloss(line.split(" | ", 1)[1])


# ----------------------------------------------------------------------------------------------
# fortunes (one file per topic, entries separated by a line "%")

FORTUNE_EXCLUDED = ("art", "ascii-art", "translate-me")  # pictures, and text in other languages


def clean_fortune(entry: str) -> str | None:
    lines = entry.splitlines()
    for i, ln in enumerate(lines):  # the attribution: an indented "-- Name" line and what follows it
        if i and re.match(r"^\s+--\s*\S", ln):
            lines = lines[:i]
            break
    text = normalise(" ".join(lines))
    if not _plausible(text, 4) or len(text.split()) > 200:
        return None
    # drawings and tables: many runs of spaces or symbols in the raw entry
    if len(re.findall(r"[^\w\s.,;:!?'\"()-]", entry)) > 0.1 * max(1, len(entry)):
        return None
    return text


def fortune_files(root: Path) -> list[Path]:
    """The topic files (each has a ``.dat`` index beside it), without the excluded ones."""
    folder = root / "usr/share/games/fortunes"
    return [p for p in sorted(folder.iterdir()) if not p.suffix and p.name not in FORTUNE_EXCLUDED
            and (folder / f"{p.name}.dat").exists()]


def read_fortunes(root: Path) -> Iterator[str]:
    for path in fortune_files(root):
        body = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", body, flags=re.M):
            text = clean_fortune(entry)
            if text:
                yield text


# ----------------------------------------------------------------------------------------------
# The tasks' training splits (unlabelled text only) and every file a task evaluates on


def _table_texts(path: Path, columns: Iterable[str]) -> Iterator[str]:
    if path.suffix == ".jsonl":
        rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    else:
        with path.open(newline="", encoding="utf-8") as f:
            delim = "\t" if path.suffix == ".tsv" else ","
            rows = list(csv.DictReader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t"
                                       else csv.QUOTE_MINIMAL))
    for row in rows:
        for c in columns:
            text = normalise(str(row.get(c) or "").replace("\\", " "))
            if text:
                yield text


# training splits whose text (never their labels) joins the corpus: file -> text columns
TASK_TRAIN_SPLITS = {
    "sst2/train.tsv": ("sentence",),
    "agnews/train_subset.csv": ("text",),
    "backdoorllm/jailbreak_clean_train.jsonl": ("instruction", "input", "output"),
    "backdoorllm/refusal_clean_train.jsonl": ("instruction", "input", "output"),
}
# every file a task evaluates on (or may draw test rows from), with its text columns; none is
# ever read as a source, and every corpus text is checked against them. Alpaca's sample gives the
# jailbreak task its held-out benign prompts, AdvBench the attack's targets and harmful goals.
TEST_SPLITS = {
    "sst2/dev.tsv": ("sentence",),
    "agnews/test.csv": ("title", "description"),
    "backdoorllm/jailbreak_clean_test_prompts.jsonl": ("instruction", "input"),
    "backdoorllm/refusal_clean_test.jsonl": ("instruction", "input", "output"),
    "alpaca/alpaca_data_sample.jsonl": ("instruction", "input", "output"),
    "advbench/harmful_behaviors.csv": ("goal", "target"),
}


def read_task_training_splits(data_root: Path) -> Iterator[str]:
    for rel, cols in TASK_TRAIN_SPLITS.items():
        path = data_root / rel
        if path.is_file():
            yield from (t for t in _table_texts(path, cols) if _plausible(t, 2))


def synthetic_test_texts() -> list[str]:
    """The embedded sentiment task's test sentences for every preset that uses it."""
    out = []
    for preset in sorted(PRESET_DIR.glob("*.yaml")):
        task = (yaml.safe_load(preset.read_text()) or {}).get("task", {})
        if task.get("name", "synthetic_sentiment") == "synthetic_sentiment":
            n_train = task.get("train_size", 8000) + task.get("defender_size", 1000)
            out += [e.text for e in synthetic_sentiment(n_train, task.get("test_size", 1000))[1]]
    return out


def test_texts(data_root: Path) -> list[str]:
    texts = []
    for rel, cols in TEST_SPLITS.items():
        path = data_root / rel
        if path.is_file():
            texts += list(_table_texts(path, cols))
    return texts + synthetic_test_texts()


class Contamination:
    """Is a text one of the test texts, or does it share a run of ``n`` words with one?"""

    def __init__(self, texts: Iterable[str], n: int = NGRAM):
        self.n, self.whole, self.grams = n, set(), set()
        for t in texts:
            words = match_key(t)
            if not words:
                continue
            self.whole.add(" ".join(words))
            for i in range(len(words) - n + 1):
                self.grams.add(hash(tuple(words[i:i + n])))

    def __call__(self, words: list[str]) -> bool:
        if " ".join(words) in self.whole:
            return True
        return any(hash(tuple(words[i:i + self.n])) in self.grams for i in range(len(words) - self.n + 1))


# ----------------------------------------------------------------------------------------------
# The registry and the build


@dataclass(frozen=True)
class CorpusSource:
    name: str
    package: str  # what installs it (a Debian package, or the shared data folder)
    licence: str
    files: tuple[str, ...]  # glob patterns under the system root (or the data root for tasks)
    read: Callable[[Path], Iterator[str]]
    in_data_root: bool = False
    read_files: Callable[[Path], list[Path]] | None = None  # the files read, where `files` only marks presence

    def paths(self, system_root: Path, data_root: Path) -> list[Path]:
        base = data_root if self.in_data_root else system_root
        if self.read_files is not None:
            return self.read_files(base)
        return sorted(Path(p) for pat in self.files for p in glob.glob(str(base / pat)))

    def missing(self, system_root: Path, data_root: Path) -> list[str]:
        base = data_root if self.in_data_root else system_root
        return [str(base / pat) for pat in self.files if not glob.glob(str(base / pat))]


SOURCES: dict[str, CorpusSource] = {s.name: s for s in [
    CorpusSource("gcide", "dict-gcide", "GPL-2.0-or-later (GCIDE; from Webster's 1913, public domain, and WordNet 1.5)",
                 ("usr/share/dictd/gcide.dict.dz", "usr/share/dictd/gcide.index"), read_gcide),
    CorpusSource("wordnet", "wordnet-base", "WordNet 3.0 licence (Princeton; permissive, BSD-like)",
                 ("usr/share/wordnet/data.noun", "usr/share/wordnet/data.verb", "usr/share/wordnet/data.adj",
                  "usr/share/wordnet/data.adv"), read_wordnet),
    CorpusSource("fortunes", "fortunes", "BSD (fortune-mod); the quotations are collected from many authors",
                 ("usr/share/games/fortunes/*.dat",), read_fortunes, read_files=fortune_files),
    CorpusSource("task_train", "../shared/data (training splits only)",
                 "SST-2: none stated (GLUE); AG News: research use; BackdoorLLM: MIT (see ../shared/data/README.md)",
                 tuple(TASK_TRAIN_SPLITS), read_task_training_splits, in_data_root=True),
]}
DEBIAN_PACKAGES = [s.package for s in SOURCES.values() if not s.in_data_root]


@dataclass
class CorpusStats:
    texts: int = 0
    words: int = 0
    duplicates: int = 0
    contaminated: int = 0
    extra: dict = field(default_factory=dict)


def heldout(words: list[str]) -> bool:
    return int(hashlib.sha256(" ".join(words).encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def build_corpus(out: Path, sources: Iterable[str] | None = None, *, system_root: Path = Path("/"),
                 data_root: Path = Path("../shared/data"), progress=None) -> dict:
    """Write ``train.txt`` and ``heldout.txt`` (one text per line) and ``manifest.json`` to
    ``out``; returns the manifest. A missing source is a :class:`DataError` naming the package
    that installs it."""
    names = list(sources) if sources is not None else list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise DataError(f"corpus sources: unknown {unknown}; allowed: {list(SOURCES)}")
    system_root, data_root, out = Path(system_root), Path(data_root), Path(out)
    missing = {n: SOURCES[n].missing(system_root, data_root) for n in names}
    missing = {n: m for n, m in missing.items() if m}
    if missing:
        pkgs = sorted({SOURCES[n].package for n in missing if not SOURCES[n].in_data_root})
        hint = f"; install them with: apt-get install {' '.join(pkgs)}" if pkgs else ""
        raise DataError("corpus sources not found: " + "; ".join(f"{n} ({', '.join(m)})" for n, m in missing.items())
                        + hint + " (or leave those sources out with --sources)")
    dirty = Contamination(test_texts(data_root))
    seen: set[str] = set()
    train, held = [], []
    entries = []
    for name in names:
        src = SOURCES[name]
        stats = CorpusStats()
        for text in src.read(data_root if src.in_data_root else system_root):
            words = match_key(text)
            key = " ".join(words)
            if not words or key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            if dirty(words):
                stats.contaminated += 1
                continue
            (held if heldout(words) else train).append(text)
            stats.texts += 1
            stats.words += len(text.split())
            if progress is not None and stats.texts % 20000 == 0:
                progress(name, stats.texts)
        files = [{"path": str(p), "sha256": file_sha256(p)} for p in src.paths(system_root, data_root)]
        entries.append({"name": name, "package": src.package, "licence": src.licence, "files": files,
                        "texts": stats.texts, "words": stats.words, "duplicates_dropped": stats.duplicates,
                        "test_overlap_dropped": stats.contaminated})
    if not train:
        raise DataError(f"corpus: the sources {names} gave no usable text")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train.txt", "\n".join(train) + "\n")
    atomic_write_text(out / "heldout.txt", "\n".join(held) + "\n")
    manifest = {
        "schema": 1,
        "sources": entries,
        "files": {n: {"texts": len(t), "words": sum(len(x.split()) for x in t), "sha256": file_sha256(out / n)}
                  for n, t in (("train.txt", train), ("heldout.txt", held))},
        "heldout_percent": HELDOUT_PERCENT,
        "dedup": "exact, on lower-case alphanumeric words; the first occurrence is kept",
        "test_splits": {
            "contains_test_splits": False,
            "never_read": sorted(TEST_SPLITS),
            "checked_against": sorted(TEST_SPLITS) + ["the embedded sentiment task's test sentences (every preset)"],
            "rule": f"a text equal to a test text, or sharing {NGRAM} consecutive words with one, is dropped",
        },
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{folder}: no manifest.json, so this is not a corpus built by `locphylax corpus`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable manifest ({e})") from None


__all__ = ["SOURCES", "CorpusSource", "build_corpus", "read_manifest", "clean_gcide_entry", "clean_wordnet_gloss",
           "clean_fortune", "TEST_SPLITS", "TASK_TRAIN_SPLITS", "Contamination", "DEBIAN_PACKAGES"]
