"""Setup: pick a preset, change any field of model / task / attack / defense / train / eval, and
see the core's own validation messages beside the fields they concern."""

import typing

import streamlit as st
import yaml

import support as S
from locphylax_core import ConfigError, RunConfig, list_presets, load_config
from locphylax_core.registry import FIELD_REGISTRIES

st.title("Setup")
st.write("Start from a preset, change what you like, then **Validate**. The configuration is checked by the "
         "same code as `locphylax run`; a valid one can be started here or on the **Run** page.")

presets = list_presets()
order = [p for p in ("demo", "sst2", "micro") if p in presets] + [p for p in presets if p not in ("demo", "sst2", "micro")]
preset = st.selectbox("Preset", order, format_func=S.preset_label, key="setup_preset")
base = load_config(preset)
base_dump = base.model_dump(mode="json")
errors: dict = st.session_state.get("setup_errors", {}) if st.session_state.get("setup_errors_for") == preset else {}

SECTIONS = ["model", "task", "attack", "defense", "train", "eval"]


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
        return st.checkbox(name, value=bool(value), key=key)
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
    raw = st.text_input(f"{name} (YAML)", value=yaml.safe_dump(value, default_flow_style=True, width=10_000).strip(),
                        key=key)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # validation reports it against this field


def _field_error(dotted: str) -> None:
    msgs = [m for loc, m in errors.items() if loc == dotted or loc.startswith(dotted + ".")]
    for m in msgs:
        st.error(f"`{dotted}`: {m}")


with st.form("config_form"):
    top = st.columns(2)
    name = top[0].text_input("name", value=base.name, key=f"f-{preset}-name")
    seed = int(top[1].number_input("seed", value=int(base.seed), step=1, key=f"f-{preset}-seed"))
    values: dict = {}
    tabs = st.tabs(SECTIONS)
    for tab, section in zip(tabs, SECTIONS):
        model_cls = type(getattr(base, section))
        with tab:
            cols = st.columns(3)
            for i, (fname, finfo) in enumerate(model_cls.model_fields.items()):
                with cols[i % 3]:
                    values[(section, fname)] = _widget(section, fname, finfo, base_dump[section][fname])
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
        st.session_state["setup_config"] = cfg.to_yaml()
        st.session_state["setup_errors"] = {}
        st.session_state["setup_overrides"] = overrides
    except ConfigError as e:
        st.session_state["setup_config"] = None
        st.session_state["setup_errors"] = dict(getattr(e, "fields", {}) or {"<config>": str(e)})
        st.session_state["setup_errors_for"] = preset
        st.session_state["setup_message"] = str(e)
    st.rerun()

if errors:
    st.error(st.session_state.get("setup_message", "invalid configuration"))
elif st.session_state.get("setup_config"):
    cfg_yaml = st.session_state["setup_config"]
    changed = st.session_state.get("setup_overrides") or {}
    st.success("Valid configuration" + (f" ({len(changed)} fields changed from the preset: "
                                        + ", ".join(f"`{k}`" for k in changed) + ")" if changed else
                                        " (the preset as it is)") + ".")
    with st.expander("The configuration as YAML"):
        st.code(cfg_yaml, language="yaml")
    if st.button("Start this run", type="primary", key="setup_start"):
        S.start_job(RunConfig.model_validate(yaml.safe_load(cfg_yaml)))
        st.switch_page("views/run.py")

with st.expander("Edit the whole configuration as YAML instead"):
    text = st.text_area("YAML", value=st.session_state.get("setup_config") or base.to_yaml(), height=300,
                        key=f"yaml-{preset}")
    if st.button("Validate YAML", key="validate_yaml"):
        try:
            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}")
            cfg = load_config(data)
            st.session_state["setup_config"] = cfg.to_yaml()
            st.session_state["setup_errors"] = {}
            st.session_state["setup_overrides"] = {"(edited as YAML)": True}
            st.success("Valid configuration.")
        except yaml.YAMLError as e:
            st.error(f"not valid YAML: {e}")
        except ConfigError as e:
            st.error(str(e))
