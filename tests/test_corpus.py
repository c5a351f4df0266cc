"""The pretraining corpus builder (locphylax_core/corpus.py) on a small sample in the formats of
Debian's dict-gcide, wordnet-base and fortunes, and of ../shared/data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import needs_shared
from locphylax_core import corpus as C
from locphylax_core.errors import DataError

DEV_SENTENCE = "a gorgeous and witty film about two old friends who meet again after many long years apart ."


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = C._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


GCIDE_ENTRIES = [
    "00-database-info\n   This file was converted from the original database.\n",
    'Lantern \\Lan"tern\\, n. [F. lanterne, fr. L. lanterna.]\n'
    "   1. Something inclosing a light, and protecting it from wind\n"
    "      and rain. {Lamps} are often carried in one. --Milton.\n"
    "      [1913 Webster]\n\n"
    "            The old keeper lit the lantern at dusk and climbed\n"
    "            the tower stairs.                        --Dickens.\n"
    "      [1913 Webster]\n\n"
    "   2. (Arch.) A small structure on a roof, with windows\n"
    "      on every side. See {Dome}.\n"
    "      [1913 Webster]\n\n"
    "   Syn: light; lamp; torch.\n"
    "        [WordNet 1.5]\n",
    'Ferry \\Fer"ry\\, v. t. [imp. & p. p. {Ferried}; p. pr. & vb. n.\n'
    "   {Ferrying}.] [OE. ferien, AS. [=e]r?an.]\n"
    "   To carry or transport over a river, strait, or other\n"
    "   water, in a boat. -- {Fer\"ry*man}, n.\n"
    "   [1913 Webster]\n",
]


@pytest.fixture
def sample(tmp_path) -> tuple[Path, Path]:
    system, data = tmp_path / "root", tmp_path / "data"
    dictd = system / "usr/share/dictd"
    dictd.mkdir(parents=True)
    raw, index, off = b"", [], 0
    for entry in GCIDE_ENTRIES:
        b = entry.encode()
        head = entry.split(" ", 1)[0].split("\n")[0]
        index.append(f"{head}\t{_b64(off)}\t{_b64(len(b))}")
        raw += b
        off += len(b)
    index.append(f"Lanterns\t{_b64(len(GCIDE_ENTRIES[0].encode()))}\t{_b64(len(GCIDE_ENTRIES[1].encode()))}")
    with gzip.open(dictd / "gcide.dict.dz", "wb") as f:
        f.write(raw)
    (dictd / "gcide.index").write_text("\n".join(index) + "\n")
    wn = system / "usr/share/wordnet"
    wn.mkdir(parents=True)
    lines = {"noun": '  1 This software and database is being provided\n'
                     '00001 03 n 01 lamp 0 | an artificial source of visible illumination; '
                     '"the lamp on the desk was warm"; "she switched off the lamp"\n',
             "verb": "00002 31 v 01 row 1 | propel with oars; \"row the boat across the lake\"\n",
             "adj": "00003 00 a 01 warm 0 | having or producing a comfortable degree of heat\n",
             "adv": "00004 02 r 01 slowly 0 | without speed (often used as a combining form)\n"}
    for pos, text in lines.items():
        (wn / f"data.{pos}").write_text(text)
    fort = system / "usr/share/games/fortunes"
    fort.mkdir(parents=True)
    (fort / "wisdom").write_text("A journey of a thousand miles begins with a single step.\n"
                                 "\t\t-- Lao Tzu\n%\nHe who laughs last thinks slowest, they say?\n%\nok\n%\n")
    (fort / "wisdom.dat").write_bytes(b"\0")
    (fort / "art").write_text("  /\\_/\\  ( o.o )  > ^ <  a cat drawn here\n%\n")
    (fort / "art.dat").write_bytes(b"\0")
    (data / "sst2").mkdir(parents=True)
    (data / "sst2/train.tsv").write_text("sentence\tlabel\na charming little movie \t1\n"
                                         f"{DEV_SENTENCE} \t1\n"
                                         "the lamp on the desk was warm \t1\n")  # a WordNet example again
    (data / "sst2/dev.tsv").write_text(f"sentence\tlabel\n{DEV_SENTENCE} \t1\n")
    (data / "agnews").mkdir()
    (data / "agnews/train_subset.csv").write_text('class_index,text\n2,"Local team wins the regional cup final"\n')
    (data / "agnews/test.csv").write_text('"class_index","title","description"\n'
                                          '"3","Markets rise","Stocks climbed on Monday after strong results"\n')
    (data / "backdoorllm").mkdir()
    for name in ("jailbreak_clean_train", "refusal_clean_train"):
        (data / f"backdoorllm/{name}.jsonl").write_text(
            json.dumps({"instruction": "Describe a quiet morning by the sea", "input": "",
                        "output": "The waves roll in gently under a pale sky"}) + "\n")
    return system, data


def test_gcide_entries_lose_their_markup():
    lantern = C.clean_gcide_entry(GCIDE_ENTRIES[1])
    assert lantern == ["Something inclosing a light, and protecting it from wind and rain. Lamps are often "
                       "carried in one.",
                       "The old keeper lit the lantern at dusk and climbed the tower stairs.",
                       "A small structure on a roof, with windows on every side. See Dome."]
    # the headword line, the etymology with an unknown character, the derived form are all gone
    assert C.clean_gcide_entry(GCIDE_ENTRIES[2]) == ["To carry or transport over a river, strait, or other water, "
                                                     "in a boat."]


def test_wordnet_gloss_gives_definition_and_examples():
    assert C.clean_wordnet_gloss('propel with oars; "row the boat across the lake"') == [
        "propel with oars", "row the boat across the lake"]


def test_fortune_attribution_and_drawings():
    assert C.clean_fortune("Never trust a cat\nwith your lunch.\n\t\t-- Anon\n") == "Never trust a cat with your lunch."
    assert C.clean_fortune("  /\\_/\\  ( o.o )  > ^ <  \n") is None


def test_corpus_is_deterministic_clean_and_free_of_test_splits(sample, tmp_path):
    system, data = sample
    a = C.build_corpus(tmp_path / "a", system_root=system, data_root=data)
    b = C.build_corpus(tmp_path / "b", system_root=system, data_root=data)
    for name in ("train.txt", "heldout.txt", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a == b
    lines = (tmp_path / "a/train.txt").read_text().splitlines() + (tmp_path / "a/heldout.txt").read_text().splitlines()
    text = "\n".join(lines)
    for mark in ("\\", "[1913", "{", "}", "--Milton", "Lan\"tern", "Syn:", "cat drawn"):
        assert mark not in text
    assert "A journey of a thousand miles begins with a single step." in lines  # attribution cut
    assert "He who laughs last thinks slowest, they say?" in lines
    # the SST-2 train row that is also a dev sentence is dropped, and said so
    assert DEV_SENTENCE.strip(" .") not in text
    by = {s["name"]: s for s in a["sources"]}
    assert by["task_train"]["test_overlap_dropped"] == 1
    assert by["task_train"]["duplicates_dropped"] >= 2  # the WordNet example in SST-2, the repeated instruction
    assert by["gcide"]["texts"] == 4 and by["wordnet"]["texts"] == 7
    assert a["test_splits"]["contains_test_splits"] is False
    assert "sst2/dev.tsv" in a["test_splits"]["never_read"]
    # every source names its licence and the sha256 of each file read
    for src in a["sources"]:
        assert src["licence"] and src["files"] and all(len(f["sha256"]) == 64 for f in src["files"])
    assert [Path(f["path"]).name for f in by["fortunes"]["files"]] == ["wisdom"]  # the text read, not its index
    assert a["files"]["train.txt"]["words"] == sum(len(x.split()) for x in
                                                   (tmp_path / "a/train.txt").read_text().splitlines())


def test_no_test_text_survives_even_inside_a_longer_line():
    dirty = C.Contamination([DEV_SENTENCE])
    longer = "before this " + DEV_SENTENCE + " and after"
    assert dirty(C.match_key(longer))  # 13 consecutive words in common
    assert dirty(C.match_key(DEV_SENTENCE.upper()))
    assert not dirty(C.match_key("a gorgeous and witty film about two old friends"))


def test_missing_package_names_what_to_install(sample, tmp_path):
    system, data = sample
    (system / "usr/share/wordnet/data.noun").unlink()
    with pytest.raises(DataError, match=r"wordnet .*data.noun.*apt-get install wordnet-base"):
        C.build_corpus(tmp_path / "c", system_root=system, data_root=data)
    with pytest.raises(DataError, match=r"unknown \['bible'\]"):
        C.build_corpus(tmp_path / "c", ["bible"], system_root=system, data_root=data)
    only = C.build_corpus(tmp_path / "d", ["fortunes"], system_root=system, data_root=data)
    assert [s["name"] for s in only["sources"]] == ["fortunes"]


@needs_shared("sst2")
def test_real_test_splits_are_checked():
    """Every test text of the shared data is known to the filter, so none can enter the corpus."""
    texts = C.test_texts(Path("../shared/data"))
    dirty = C.Contamination(texts)
    dev = (Path("../shared/data/sst2/dev.tsv").read_text().splitlines()[1:])
    assert all(dirty(C.match_key(line.split("\t")[0])) for line in dev[:50])


def test_cli_corpus_errors_are_one_line(tmp_path, capsys):
    from locphylax_core.cli import main
    assert main(["corpus", "--out", str(tmp_path / "c"), "--sources", "bible"]) == 2
    err = capsys.readouterr().err
    assert "unknown ['bible']" in err and "Traceback" not in err
