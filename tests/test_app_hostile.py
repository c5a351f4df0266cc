"""The app against a hostile or careless user (issue 34): an input longer than the model's
positions is cut as the evaluation cuts it, and the page says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from locphylax_core import runview as R
from test_app import app, demo_root, run_view, texts  # noqa: F401  (fixtures)

pytest.importorskip("streamlit")

REPO = Path(__file__).resolve().parent.parent
LONG_REVIEW = " ".join(["the film was long and slow but the music was lovely ."] * 12)  # 132 words


# ----------------------------------------------------------------------------------------------
# Long inputs


@pytest.fixture(scope="module")
def victim(run_view):  # noqa: F811
    return R.load_stage_model(run_view, "victim")


def test_a_long_input_is_cut_to_the_models_positions_keeping_its_end(run_view, victim):  # noqa: F811
    limit = run_view.config["model"]["n_positions"]
    short = "a fine and moving film"
    assert R.input_cut(run_view, victim, short) == 0
    cut = R.input_cut(run_view, victim, LONG_REVIEW)
    assert cut > 0
    (word,) = R.answer(run_view, victim, [LONG_REVIEW])
    ((same, p),) = R.answer_with_probability(run_view, victim, [LONG_REVIEW])
    assert word == same and word in run_view.label_words and 0 < p <= 1
    sal = R.sentence_salience(run_view, victim, LONG_REVIEW, n_steps=4)
    assert sal["cut"] == cut and len(sal["tokens"]) == limit == len(sal["scores"])
    # the end is kept: the last tokens are the prompt's own (the answer position), as the evaluation encodes it
    prompt = run_view.config["task"]["template"].replace("{text}", LONG_REVIEW)
    ids = victim.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert victim.tokenizer.convert_ids_to_tokens(ids[-limit:]) == sal["tokens"]


def test_a_long_review_in_the_live_demo_is_cut_and_the_page_says_so(demo_root, monkeypatch):  # noqa: F811
    at = app(demo_root, monkeypatch)
    at.text_input(key="demo-try").set_value(LONG_REVIEW).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "longer than the model reads" in texts(at.info)
    assert len(at.table[-1].value) == 3  # each stage still answers


def test_a_long_probe_input_in_the_inspector_is_cut_and_the_page_says_so(run_view, tmp_path, monkeypatch):  # noqa: F811
    root = tmp_path / "runs"
    dst = root / run_view.run_id
    shutil.copytree(run_view.path, dst)
    rows = [json.loads(line) for line in (dst / "probe.jsonl").read_text().splitlines() if line.strip()]
    rows[0]["text"] = LONG_REVIEW
    (dst / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at = app(root, monkeypatch, "aggregation", {"run": run_view.run_id, "point": "0"})
    assert not at.exception, [e.value for e in at.exception]
    assert "Inspector" in texts(at.subheader)
    assert "longer than the model reads" in texts(at.info)
