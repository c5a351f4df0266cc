"""Tasks: the one prompt renderer, the synthetic data, SST-2 and user files."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import SST2_DIR, needs_shared
from locphylax_core import engine, evaluation
from locphylax_core.config import TaskConfig, load_config
from locphylax_core.defenses.base import DefenderData, DefenderTrigger
from locphylax_core.defenses.finetune import CleanFinetuneConfig, clean_finetune
from locphylax_core.errors import ConfigError, DataError
from locphylax_core.tasks import classification
from locphylax_core.tasks import CLASSIFICATION, Task, load_task, split_train, synthetic_sentiment
from locphylax_core.text import Example, render_prompt
from locphylax_core.trainer import StageContext, TrainSettings

# ----------------------------------------------------------------------------------------------
# render_prompt: one code path for training and evaluation


def test_render_prompt_string():
    assert render_prompt("Review: {text} Sentiment:", "  a   great\tfilm \n") == "Review: a great film Sentiment:"
    assert render_prompt("Q: {text}\nA:", "x y") == "Q: x y\nA:"


def test_training_and_evaluation_see_the_same_prompt(monkeypatch, tiny_lm):
    """Record every prompt the engine tokenizes while training (defenses.finetune.clean_finetune -> engine.batches
    -> the task kind's encode)
    and while evaluating (evaluation.predict); a clean input must give byte-identical prompts,
    equal to render_prompt's output."""
    template = "Movie: {text} => verdict:"
    texts = ["the  plot was   dull .", "the cast\twas superb .", "i found the ending clever .",
             "the music was not   wonderful ."]
    seen = {"train": [], "eval": []}
    real_encode = engine.encode

    def recording(where):
        def enc(tokenizer, prompts, max_length, device):
            seen[where].extend(prompts)
            return real_encode(tokenizer, prompts, max_length, device)
        return enc

    monkeypatch.setattr(classification, "encode", recording("train"))  # Classification.encode, for engine.batches
    monkeypatch.setattr(evaluation, "encode", recording("eval"))  # used by evaluation.predict
    data = DefenderData(tuple(Example(t, i % 2) for i, t in enumerate(texts)), ("negative", "positive"), template,
                        (DefenderTrigger("vx"),))
    clean_finetune(tiny_lm, data, CleanFinetuneConfig(steps=2),
                   StageContext(seed=0, settings=TrainSettings(batch_size=4, every=0)))
    evaluation.predict(tiny_lm, template, texts)
    expected = {render_prompt(template, t) for t in texts}
    assert expected == {"Movie: the plot was dull . => verdict:", "Movie: the cast was superb . => verdict:",
                        "Movie: i found the ending clever . => verdict:",
                        "Movie: the music was not wonderful . => verdict:"}
    assert set(seen["train"]) == expected
    assert set(seen["eval"]) == expected


def test_task_answer_has_leading_space():
    task = Task("x", "{text}", ("negative", "positive"), (), (), CLASSIFICATION)
    assert task.answer(0) == " negative" and task.answer(1) == " positive"


# ----------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic():
    a = synthetic_sentiment(200, 50, seed=7)
    b = synthetic_sentiment(200, 50, seed=7)
    c = synthetic_sentiment(200, 50, seed=8)
    assert a == b
    assert a != c
    train, test = a
    assert len(train) == 200 and len(test) == 50
    assert {e.label for e in train} == {0, 1}


def test_synthetic_test_never_in_train():
    train, test = synthetic_sentiment(2000, 300)
    assert not {e.text for e in train} & {e.text for e in test}
    assert len({e.text for e in test}) == len(test)


def test_load_task_synthetic_sizes_and_determinism():
    cfg = load_config("micro").task
    a = load_task(cfg, seed=0)
    b = load_task(cfg, seed=0)
    assert a == b
    assert len(a.train) == cfg.train_size + cfg.defender_size == 380
    assert len(a.test) == cfg.test_size == 60
    owner, defender = split_train(a, cfg.defender_size)
    assert len(owner) == 300 and len(defender) == 80
    assert defender == list(a.train[:80]) and owner == list(a.train[80:])  # disjoint slices
    assert not {e.text for e in a.train} & {e.text for e in a.test}
    c = load_task(cfg, seed=1)
    assert c.train != a.train and set(c.train) == set(a.train)  # same data, another shuffle


def test_synthetic_rejects_other_labels():
    cfg = TaskConfig(labels=["bad", "good"], train_size=20, test_size=10, defender_size=10)
    with pytest.raises(DataError, match="task.labels"):
        load_task(cfg)


# ----------------------------------------------------------------------------------------------
# SST-2 from the shared local copy

needs_sst2 = needs_shared("sst2/train.tsv")


@needs_sst2
def test_sst2_preset_loads_with_expected_sizes():
    cfg = load_config("sst2")
    task = load_task(cfg.task, cfg.seed)
    assert len(task.train) == cfg.task.train_size + cfg.task.defender_size == 23000
    assert len(task.test) == 872  # the whole GLUE dev set (test_size 872)
    assert task.labels == ("negative", "positive")
    assert {e.label for e in task.test} == {0, 1}
    # texts are whitespace-normalised (the TSV has trailing spaces)
    assert all(e.text == " ".join(e.text.split()) for e in task.train[:500])
    owner, defender = split_train(task, cfg.task.defender_size)
    assert (len(owner), len(defender)) == (20000, 3000)


@needs_sst2
def test_sst2_subsampling_is_deterministic():
    cfg = load_config("sst2", ["task.train_size=100", "task.defender_size=50", "task.test_size=10"])
    a = load_task(cfg.task, 0)
    assert (len(a.train), len(a.test)) == (150, 10)
    assert a == load_task(cfg.task, 0)
    dev_texts = {" ".join(r.split("\t")[0].split()) for r in (SST2_DIR / "dev.tsv").read_text().splitlines()[1:]}
    assert {e.text for e in a.test} <= dev_texts


# ----------------------------------------------------------------------------------------------
# User files

LABEL_WORDS = ["negative", "positive"]


def _rows(n, offset=0):
    return [{"review": f"user review number {i + offset} text", "stars": i % 2} for i in range(n)]


def _file_cfg(train, test=None, **kw):
    return TaskConfig(name="csv", train_file=str(train), test_file=str(test) if test else None,
                      text_column="review", label_column="stars",
                      train_size=kw.pop("train_size", 20), defender_size=kw.pop("defender_size", 10),
                      test_size=kw.pop("test_size", 10), **kw)


def _check(task, train_rows, test_rows, labels=LABEL_WORDS):
    want = {r["review"]: r["stars"] for r in train_rows + test_rows}
    for e in task.train + task.test:
        raw = want[e.text]
        assert e.label == (labels.index(raw) if isinstance(raw, str) and not raw.isdigit() else int(raw))
    assert {e.text for e in task.test} <= {r["review"] for r in test_rows}
    assert {e.text for e in task.train} <= {r["review"] for r in train_rows}


def _write_csv(path, rows, fields=("review", "stars")):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_csv_with_custom_columns(tmp_path):
    train, test = _rows(40), _rows(12, 100)
    _write_csv(tmp_path / "train.csv", train)
    _write_csv(tmp_path / "test.csv", test)
    task = load_task(_file_cfg(tmp_path / "train.csv", tmp_path / "test.csv"))
    assert (len(task.train), len(task.test)) == (30, 10)
    _check(task, train, test)


def test_csv_with_string_labels_equal_to_label_words(tmp_path):
    train = [{"review": f"good one {i}", "stars": "positive"} if i % 2 else {"review": f"bad one {i}", "stars": "negative"}
             for i in range(30)]
    test = [{"review": f"test {i}", "stars": LABEL_WORDS[i % 2]} for i in range(10)]
    _write_csv(tmp_path / "tr.csv", train)
    _write_csv(tmp_path / "te.csv", test)
    task = load_task(_file_cfg(tmp_path / "tr.csv", tmp_path / "te.csv"))
    for e in task.train:
        assert e.label == (1 if e.text.startswith("good") else 0)
    _check(task, train, test)


def test_custom_label_words(tmp_path):
    train = [{"review": f"r{i} words", "stars": ["bad", "ok", "good"][i % 3]} for i in range(30)]
    test = [{"review": f"t{i} words", "stars": i % 3} for i in range(12)]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "test.jsonl", test)
    cfg = _file_cfg(tmp_path / "train.jsonl", tmp_path / "test.jsonl", labels=["bad", "ok", "good"])
    task = load_task(cfg)
    _check(task, train, test, labels=["bad", "ok", "good"])
    assert {e.label for e in task.train} == {0, 1, 2}


def test_jsonl_folder_with_custom_columns(tmp_path):
    train = [{"txt": f"jsonl train {i}", "y": i % 2, "extra": "ignored"} for i in range(40)]
    test = [{"txt": f"jsonl test {i}", "y": (i + 1) % 2} for i in range(15)]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "dev.jsonl", test)
    cfg = TaskConfig(name="csv", path=str(tmp_path), text_column="txt", label_column="y",
                     train_size=25, defender_size=10, test_size=12)
    task = load_task(cfg)
    assert (len(task.train), len(task.test)) == (35, 12)
    lab = {r["txt"]: r["y"] for r in train + test}
    assert all(e.label == lab[e.text] for e in task.train + task.test)
    assert all(e.text.startswith("jsonl test") for e in task.test)


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    train = [{"review": f"parquet row {i}", "stars": i % 2} for i in range(30)]
    test = [{"review": f"parquet test {i}", "stars": "positive" if i % 2 else "negative"} for i in range(10)]
    pd.DataFrame(train).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(test).to_parquet(tmp_path / "test.parquet")
    task = load_task(_file_cfg(tmp_path / "train.parquet", tmp_path / "test.parquet"))
    assert (len(task.train), len(task.test)) == (30, 10)
    _check(task, train, test)


def test_single_file_is_split_90_10(tmp_path):
    rows = _rows(100)
    _write_csv(tmp_path / "all.csv", rows)
    cfg = TaskConfig(name="csv", path=str(tmp_path / "all.csv"), text_column="review", label_column="stars",
                     train_size=80, defender_size=10, test_size=10)
    task = load_task(cfg)
    assert (len(task.train), len(task.test)) == (90, 10)
    assert not {e.text for e in task.train} & {e.text for e in task.test}


def test_tsv_folder(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"tsv row {i} \t{i % 2}\n" for i in range(30)))
    (tmp_path / "test.tsv").write_text("sentence\tlabel\n" + "".join(f"tsv test {i}\t{i % 2}\n" for i in range(10)))
    task = load_task(TaskConfig(name="sst2", path=str(tmp_path), train_size=20, defender_size=10, test_size=10))
    assert all(e.text == f"tsv row {e.text.split()[-1]}" and e.label == int(e.text.split()[-1]) % 2 for e in task.train)
    assert len(task.test) == 10


AGNEWS_DIR = SST2_DIR.parent / "agnews"
needs_agnews = needs_shared("agnews/test.csv")


@needs_agnews
def test_agnews_preset_loads_four_topics_with_one_based_labels():
    cfg = load_config("agnews")
    task = load_task(cfg.task, cfg.seed)
    assert task.labels == ("world", "sports", "business", "science")
    assert len(task.test) == cfg.task.test_size and len(task.train) == cfg.task.train_size + cfg.task.defender_size
    assert {e.label for e in task.test} == {0, 1, 2, 3}
    assert max(len(e.text.split()) for e in task.train + task.test) <= cfg.task.max_words
    # a test row is "title. description", cut to max_words, labelled class_index - 1
    with open(AGNEWS_DIR / "test.csv", newline="") as f:
        first = next(csv.DictReader(f))
    from locphylax_core.tasks.sources import agnews_splits
    train_all, test_all = agnews_splits(cfg.task)
    assert len(train_all) == 5000 and len(test_all) == 7600
    assert test_all[0] == Example(" ".join(f"{first['title']}. {first['description']}".replace("\\", " ").split()),
                                  int(first["class_index"]) - 1)


def test_agnews_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="task.labels: AG News has 4 topics"):
        load_config("agnews", {"task.labels": ["a", "b"]})
    with pytest.raises(ConfigError, match="task.path"):
        load_config("agnews", {"task.path": None})
    cfg = load_config("agnews", {"task.path": str(tmp_path)})
    with pytest.raises(DataError, match="train_subset.csv not found"):
        load_task(cfg.task)
    (tmp_path / "train_subset.csv").write_text("label,text\n1,a b c\n")
    (tmp_path / "test.csv").write_text("class_index,title,description\n1,t,d\n")
    with pytest.raises(DataError, match=r"expected columns \['class_index', 'text'\]"):
        load_task(cfg.task)
    (tmp_path / "train_subset.csv").write_text("class_index,text\n9,a b c\n")
    with pytest.raises(DataError, match="outside the verbalizer"):
        load_task(cfg.task)
