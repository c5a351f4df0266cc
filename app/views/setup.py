"""Setup: pick a preset, change any field of model / task / attack / defense / train / eval, and
see the core's own validation messages beside the fields they concern.

A validated configuration belongs to the preset it was validated for: switching preset drops it.
It survives a browser refresh: its YAML is saved under the run store as
``<runs>/.setup/<sha256>.yaml`` and the URL carries ``?preset=<name>&config=<sha256>``; on load it
is read back and validated again (the core may have changed since)."""

import hashlib
import re
import typing

import streamlit as st
import yaml

import support as S
from locphylax_core import ConfigError, RunConfig, list_presets, load_config
from locphylax_core.config import load_yaml_text
from locphylax_core.registry import FIELD_REGISTRIES
from locphylax_core.runs import atomic_write_text

SECTIONS = ["model", "task", "attack", "defense", "train", "eval"]
SAVED_DIR = ".setup"  # under the run store; list_runs skips dot folders
CONFIG_ID = re.compile(r"[0-9a-f]{64}")  # a saved configuration's name: the sha256 of its YAML


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _inline_yaml(value) -> str:
    """A value as one line of flow-style YAML. yaml.safe_dump ends a lone scalar with the document
    end marker (``auto\\n...``), which is noise in a one-line field."""
    return re.sub(r"\n\.\.\.$", "", yaml.safe_dump(value, default_flow_style=True, width=10_000).strip())


def _without_paths(message: str) -> str:
    """A ConfigError's text without the server file it came from (the page never shows a path)."""
    message = re.sub(r"^invalid configuration \([^)]*\):\s*", "", message)
    return re.sub(r"(?:/[^\s/:()'\"]+)+/([^\s/:()'\"]+\.ya?ml)", r"\1", message)


def _error_fields(e: ConfigError) -> dict:
    """Dotted field name -> message; an error that names no field is filed under ``<config>``."""
    return dict(getattr(e, "fields", None) or {"<config>": _without_paths(str(e))})


def _error_lines(errors: dict) -> str:
    return "  \n".join(S.esc(m, 2000) if loc == "<config>" else f"{S.code(loc)}: {S.esc(m, 2000)}"
                       for loc, m in errors.items())


def _changed_fields(validated: dict, preset_values: dict) -> list[str]:
    """The dotted names whose value differs from the preset's."""
    changed = []
    for key, value in validated.items():
        if isinstance(value, dict) and isinstance(preset_values.get(key), dict):
            changed += [f"{key}.{f}" for f, v in value.items() if v != preset_values[key].get(f)]
        elif value != preset_values.get(key):
            changed.append(key)
    return changed


# ----------------------------------------------------------------------------------------------
# The validated configuration: session state for this tab, a saved file and the URL for a refresh


def _forget() -> None:
    for k in ("setup_config", "setup_config_for", "setup_config_id", "setup_keep_problem"):
        st.session_state.pop(k, None)


def _keep(cfg: RunConfig, preset: str) -> None:
    """Make ``cfg`` the validated configuration of ``preset`` and save it so a refresh finds it."""
    text = cfg.to_yaml()
    config_id = hashlib.sha256(text.encode("utf-8")).hexdigest()
    st.session_state.update(setup_config=text, setup_config_for=preset, setup_config_id=config_id,
                            setup_errors={}, setup_errors_for=preset)
    st.session_state.pop("setup_keep_problem", None)
    path = S.runs_root() / SAVED_DIR / f"{config_id}.yaml"
    try:
        if not path.is_file():  # named by its content, so an existing file already holds it
            atomic_write_text(path, text)
    except OSError as e:
        st.session_state["setup_config_id"] = None
        st.session_state["setup_keep_problem"] = (f"It could not be saved under the run store ({S.esc(e.strerror or e)}), "
                                                  "so a browser refresh will lose it.")


def _restore(config_id: str, preset: str) -> None:
    """The configuration a link (or a refresh) names, validated again; a message when it cannot be."""
    if not CONFIG_ID.fullmatch(config_id):
        st.warning("The link's `config` is not the id of a saved configuration; nothing was restored.")
        return
    try:
        text = (S.runs_root() / SAVED_DIR / f"{config_id}.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        st.warning("The configuration this link names is no longer saved in the run store; validate it again.")
        return
    try:
        data = load_yaml_text(text, "the saved configuration")  # bounded: no alias bomb expands
        if not isinstance(data, dict):
            raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}")
        cfg = load_config(data)
    except ConfigError as e:
        st.error("The configuration this link names no longer validates:  \n" + _error_lines(_error_fields(e)))
        return
    _keep(cfg, preset)


def _sync_link(preset: str) -> None:
    """The URL names the preset and the validated configuration, so a refresh restores both."""
    if st.query_params.get("preset") != preset:
        st.query_params["preset"] = preset
    config_id = st.session_state.get("setup_config_id")
    if config_id and st.query_params.get("config") != config_id:
        st.query_params["config"] = config_id
    elif not config_id and "config" in st.query_params:
        del st.query_params["config"]


# ----------------------------------------------------------------------------------------------

st.title("Setup")
st.write("Start from a preset, change what you like, then **Validate**. The configuration is checked by the "
         "same code as `locphylax run`; a valid one can be started here or on the **Run** page.")

presets = list_presets()
order = [p for p in ("demo", "sst2", "micro") if p in presets] + [p for p in presets if p not in ("demo", "sst2", "micro")]
link_preset, link_config = st.query_params.get("preset"), st.query_params.get("config")
if link_preset is not None and link_preset not in order and "setup_preset" not in st.session_state:
    st.warning(f"The link names no preset called {S.code(link_preset, 60)}; showing the first one.")
preset = st.selectbox("Preset", order, index=order.index(link_preset) if link_preset in order else 0,
                      format_func=S.preset_label, key="setup_preset")
try:
    base = load_config(preset)
except ConfigError as e:  # a preset file edited by hand
    st.error(f"The preset {S.code(preset)} does not load:  \n" + _error_lines(_error_fields(e)))
    st.stop()
base_dump = base.model_dump(mode="json")

if st.session_state.get("setup_config_for") != preset:  # nothing validated yet, or for another preset
    _forget()
    if link_config and link_preset == preset:  # a refresh or a shared link
        _restore(link_config, preset)
_sync_link(preset)

validated_yaml = st.session_state.get("setup_config")
form_values = yaml.safe_load(validated_yaml) if validated_yaml else base_dump  # what the form starts from
errors: dict = st.session_state.get("setup_errors", {}) if st.session_state.get("setup_errors_for") == preset else {}
FORM_FIELDS = {"name", "seed"} | {f"{section}.{f}" for section in SECTIONS
                                  for f in type(getattr(base, section)).model_fields}


def _args(ann):
    return typing.get_args(ann)


def _widget(section: str, name: str, finfo, value):
    """One input widget chosen from the field's type; complex values are edited as YAML."""
    key = f"f-{preset}-{section}-{name}"
    ann = finfo.annotation
    origin = typing.get_origin(ann)
    optional = origin is typing.Union and type(None) in _args(ann)
    inner = [a for a in _args(ann) if a is not type(None)] if origin is typing.Union else [ann]
    extra = finfo.json_schema_extra if isinstance(finfo.json_schema_extra, dict) else {}
    registry = FIELD_REGISTRIES.get(extra.get("registry"))
    if registry is not None:  # the choices are what is registered (a plug-in's entries included)
        names = registry.names()
        label = lambda n: f"{registry.label(n)} ({n})"  # noqa: E731
        if isinstance(value, list):
            return st.multiselect(name, names, default=[v for v in value if v in names], format_func=label, key=key)
        return st.selectbox(name, names, index=names.index(value) if value in names else 0, format_func=label,
                            key=key)
    if len(inner) == 1 and typing.get_origin(inner[0]) is typing.Literal:
        options = list(_args(inner[0]))
        return st.selectbox(name, options, index=options.index(value) if value in options else 0, key=key)
    if inner == [bool]:
        return st.checkbox(name, value=bool(value), key=key, help=FIELD_HELP.get(f"{section}.{name}"))
    if inner == [int]:  # an optional number may be left empty (None)
        v = st.number_input(name, value=None if value is None else int(value), step=1, key=key,
                            help="empty = none" if optional else None)
        return None if v is None else int(v)
    if inner == [float]:
        v = st.number_input(name, value=None if value is None else float(value), format="%g", key=key,
                            help="empty = none" if optional else None)
        return None if v is None else float(v)
    if inner == [str]:
        raw = st.text_input(name, value="" if value is None else str(value), key=key,
                            help="empty = the default" if optional else None)
        return None if (optional and raw.strip() == "") else raw
    raw = st.text_input(f"{name} (YAML)", value=_inline_yaml(value), key=key)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # validation reports it against this field


FIELD_HELP = {"model.trust_remote_code": "Runs the Python code that comes with the model folder or hub repository "
                                        "(model.name_or_path) on this machine. Starting such a run asks for a "
                                        "confirmation first."}


def _shown_beside_a_field(loc: str) -> bool:
    return any(loc == d or loc.startswith(d + ".") for d in FORM_FIELDS)


def _field_error(dotted: str) -> None:
    msgs = [m for loc, m in errors.items() if loc == dotted or loc.startswith(dotted + ".")]
    for m in msgs:
        st.error(f"{S.code(dotted)}: {S.esc(m, 2000)}")


with st.form("config_form"):
    top = st.columns(2)
    with top[0]:
        name = st.text_input("name", value=form_values["name"], key=f"f-{preset}-name")
        _field_error("name")
    with top[1]:
        seed = int(st.number_input("seed", value=int(form_values["seed"]), step=1, key=f"f-{preset}-seed"))
        _field_error("seed")
    values: dict = {}
    tabs = st.tabs(SECTIONS)
    for tab, section in zip(tabs, SECTIONS):
        model_cls = type(getattr(base, section))
        with tab:
            cols = st.columns(3)
            for i, (fname, finfo) in enumerate(model_cls.model_fields.items()):
                with cols[i % 3]:
                    values[(section, fname)] = _widget(section, fname, finfo, form_values[section][fname])
                    _field_error(f"{section}.{fname}")
    submitted = st.form_submit_button("Validate", type="primary")

if submitted:
    # only what the user changed is applied on top of the preset, so e.g. switching
    # defense.method also switches the settings that method implies
    overrides = {f"{sec}.{f}": v for (sec, f), v in values.items() if v != base_dump[sec][f]}
    if name != base.name:
        overrides["name"] = name
    if seed != base.seed:
        overrides["seed"] = seed
    try:
        cfg = load_config(preset, overrides)
    except ConfigError as e:
        _forget()
        st.session_state.update(setup_errors=_error_fields(e), setup_errors_for=preset)
    else:
        _keep(cfg, preset)
    st.rerun()

if errors:
    # the messages themselves stand beside their fields; the page only says where to look
    beside = [loc for loc in errors if _shown_beside_a_field(loc)]
    elsewhere = {loc: m for loc, m in errors.items() if loc not in beside}
    summary = [f"{_plural(len(beside), 'field needs', 'fields need')} attention: "
               + ", ".join(S.code(loc) for loc in beside)] if beside else []
    st.error("  \n".join(summary + ([_error_lines(elsewhere)] if elsewhere else [])))
elif validated_yaml:
    changed = _changed_fields(yaml.safe_load(validated_yaml), base_dump)
    st.success("Valid configuration" + (f" ({_plural(len(changed), 'field', 'fields')} changed from the preset: "
                                        + ", ".join(S.code(k) for k in changed) + ")" if changed else
                                        " (the preset as it is)") + ".")
    if st.session_state.get("setup_keep_problem"):
        st.warning(st.session_state["setup_keep_problem"])
    with st.expander("The configuration as YAML"):
        st.code(validated_yaml, language="yaml")
    cfg = RunConfig.model_validate(yaml.safe_load(validated_yaml))
    remote_code_ok = S.remote_code_confirmed(cfg, "setup_remote_code_ok")
    if st.button("Start this run", type="primary", key="setup_start", disabled=not remote_code_ok):
        S.start_job(cfg, remote_code_ok=remote_code_ok)
        st.switch_page("views/run.py")

with st.expander("Edit the whole configuration as YAML instead"):
    text = st.text_area("YAML", value=validated_yaml or base.to_yaml(), height=300, key=f"yaml-{preset}")
    if st.button("Validate YAML", key="validate_yaml"):
        try:
            data = load_yaml_text(text, "the YAML")  # bounded: an alias bomb is refused, not expanded
            if not isinstance(data, dict):
                raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}")
            cfg = load_config(data)
        except ConfigError as e:
            st.error(_error_lines(_error_fields(e)))
        else:
            _keep(cfg, preset)
            st.rerun()
