"""Language-model pretraining of the embedded model on generic local text (train.pretrain_*)."""

from __future__ import annotations


import pytest
import torch

from conftest import needs_shared
from locphylax_core import load_config
from locphylax_core import model as M
from locphylax_core.errors import DataError
from locphylax_core.pipeline import prepare, train_owner_model
from locphylax_core.tasks import pretraining_texts

SHARED = "../shared/data"


def test_pretraining_texts_reads_every_text_column(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"instruction": "say  hi", "input": "", "output": "hi there", "id": 3}\n'
                 '{"instruction": "count", "input": "1 2", "output": "3"}\n')
    assert pretraining_texts([str(f)]) == ["say hi", "hi there", "count", "1 2", "3"]
    assert len(pretraining_texts(["embedded"], limit=5)) == 5


def test_pretraining_texts_rejects_a_file_without_text_columns(tmp_path):
    f = tmp_path / "nums.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"train.pretrain_corpus: .*nums.csv has none of the text columns"):
        pretraining_texts([str(f)])


@needs_shared("agnews")
def test_pretraining_texts_on_the_shared_data():
    texts = pretraining_texts([f"{SHARED}/agnews/train_subset.csv", f"{SHARED}/advbench/harmful_behaviors.csv"])
    assert len(texts) == 5000 + 520  # AG News: text; AdvBench: goal (its 'target' column is no text column)


def test_clean_model_is_pretrained_first():
    def clean_weights(steps):
        cfg = load_config("micro", {"train.pretrain_steps": steps, "train.clean_steps": 2})
        prep = prepare(cfg)
        lm = M.LM(M.build_embedded(cfg.model, prep.tokenizer, seed=0), prep.tokenizer, prep.answer_ids)
        train_owner_model(prep, lm, "clean", from_scratch=True, seed=0)
        return lm.model.state_dict()
    plain, pre, again = clean_weights(0), clean_weights(4), clean_weights(4)
    assert any(not torch.equal(plain[k], pre[k]) for k in plain)
    assert all(torch.equal(pre[k], again[k]) for k in pre)  # seeded: the same weights twice
