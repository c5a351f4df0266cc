"""The Setup and Run pages, driven by streamlit.testing's AppTest on an empty run store: a validated
configuration belongs to its preset and survives a refresh (the URL names it), one-line YAML fields
and page-level errors read plainly, and a cancelled job says it stopped and offers to resume."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from locphylax_core import jobs, load_config

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402  (type of the pages under test)

from test_app import app, launched, texts  # noqa: E402, F401  (launched: a fixture)


def validate(at: AppTest) -> AppTest:
    (button,) = [b for b in at.button if b.label == "Validate"]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# ----------------------------------------------------------------------------------------------
# Setup


def test_switching_preset_drops_the_configuration_validated_for_the_other(tmp_path, monkeypatch, launched):
    at = app(tmp_path, monkeypatch, "setup")
    at.selectbox(key="setup_preset").set_value("micro").run()
    at.number_input(key="f-micro-seed").set_value(7)
    validate(at)
    assert "Valid configuration (1 field changed from the preset: `seed`)." in texts(at.success)
    assert "name: micro" in texts(at.code)
    at.selectbox(key="setup_preset").set_value("demo").run()
    assert not at.success, texts(at.success)
    assert "name: micro" not in texts(at.code) and "seed: 7" not in texts(at.code)
    assert "setup_start" not in [b.key for b in at.button]
    assert "config" not in at.query_params and at.query_params["preset"] == "demo"
    # validated for demo, Start starts demo's configuration
    validate(at)
    assert "the preset as it is" in texts(at.success)
    at.button(key="setup_start").click().run()
    assert [c["cfg"] for c in launched] == [load_config("demo")]


def test_a_refresh_restores_the_validated_configuration(tmp_path, monkeypatch, launched):
    at = app(tmp_path, monkeypatch, "setup")
    at.selectbox(key="setup_preset").set_value("micro").run()
    at.number_input(key="f-micro-seed").set_value(7)
    at.number_input(key="f-micro-attack-poison_rate").set_value(0.3)
    validate(at)
    link = dict(at.query_params)
    assert link["preset"] == "micro"
    expected = load_config("micro", {"seed": 7, "attack.poison_rate": 0.3})
    saved = tmp_path / ".setup" / f"{link['config']}.yaml"
    assert saved.read_text() == expected.to_yaml()
    assert link["config"] == hashlib.sha256(expected.to_yaml().encode()).hexdigest()

    again = app(tmp_path, monkeypatch, "setup", query=link)  # a new session, as after a refresh
    assert again.selectbox(key="setup_preset").value == "micro"
    ok = texts(again.success)
    assert "Valid configuration (2 fields changed from the preset: `seed`, `attack.poison_rate`)" in ok
    assert again.number_input(key="f-micro-seed").value == 7  # the form shows what was validated
    assert again.number_input(key="f-micro-attack-poison_rate").value == 0.3
    assert "seed: 7" in texts(again.code)
    again.button(key="setup_start").click().run()
    assert launched[-1]["cfg"] == expected


def test_a_link_to_a_configuration_that_no_longer_validates_says_so(tmp_path, monkeypatch):
    stale = load_config("micro").model_dump(mode="json")
    stale["attack"]["poison_rate"] = 2.0  # e.g. saved before the core tightened a bound
    text = yaml.safe_dump(stale, sort_keys=False)
    config_id = hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / ".setup").mkdir()
    (tmp_path / ".setup" / f"{config_id}.yaml").write_text(text)
    at = app(tmp_path, monkeypatch, "setup", query={"preset": "micro", "config": config_id})
    shown = texts(at.error)
    assert "no longer validates" in shown and "`attack.poison_rate`: must be in (0, 1] (got 2.0)" in shown
    assert str(tmp_path) not in shown
    assert not at.success and "config" not in at.query_params


@pytest.mark.parametrize("config_id", ["../../etc/passwd", "0" * 64])
def test_a_link_to_an_unknown_configuration_is_a_warning(tmp_path, monkeypatch, config_id):
    at = app(tmp_path, monkeypatch, "setup", query={"preset": "micro", "config": config_id})
    assert "nothing was restored" in texts(at.warning) or "no longer saved" in texts(at.warning)
    assert not at.success and not at.error
    assert at.selectbox(key="setup_preset").value == "micro" and "config" not in at.query_params


def test_one_value_yaml_fields_show_no_document_end_marker(tmp_path, monkeypatch):
    at = app(tmp_path, monkeypatch, "setup")
    at.selectbox(key="setup_preset").set_value("micro").run()
    assert at.text_input(key="f-micro-defense-alpha").value == "auto"
    assert at.text_input(key="f-micro-attack-parts").value == "null"
    assert not [t.label for t in at.text_input if "..." in str(t.value)]
    validate(at)  # the plain values read back as the preset's own
    assert "the preset as it is" in texts(at.success)


def test_page_error_summarises_the_inline_errors_without_a_server_path(tmp_path, monkeypatch):
    at = app(tmp_path, monkeypatch, "setup")
    at.selectbox(key="setup_preset").set_value("micro").run()
    at.number_input(key="f-micro-attack-poison_rate").set_value(2.0)
    at.number_input(key="f-micro-defense-stage1_steps").set_value(0)
    validate(at)
    errors = [str(e.value) for e in at.error]
    assert "2 fields need attention: `attack.poison_rate`, `defense.stage1_steps`" in errors
    # each field's message is shown once, beside its field
    assert sum("must be in (0, 1] (got 2.0)" in e for e in errors) == 1
    assert sum("greater than or equal to 1" in e for e in errors) == 1
    assert not [e for e in errors if "invalid configuration" in e or ".yaml" in e or "/" in e]

    at.number_input(key="f-micro-defense-stage1_steps").set_value(4)
    validate(at)
    assert "1 field needs attention: `attack.poison_rate`" in [str(e.value) for e in at.error]


# ----------------------------------------------------------------------------------------------
# Run


@pytest.fixture()
def fake_job(tmp_path, monkeypatch):
    """One job whose phase the test sets; Cancel stops it. Its run folder holds a config.yaml and
    a finished victim stage, as a real run cancelled in Stage 1 would."""
    run_id = "20990101-000000-micro"
    (tmp_path / run_id).mkdir()
    (tmp_path / run_id / "config.yaml").write_text(load_config("micro").to_yaml())
    job = {"phase": "training", "cancelled": 0}

    def status(runs_root, rid, log=True):
        if rid != run_id:
            return jobs.JobStatus(rid, "missing", False)
        return jobs.JobStatus(run_id, job["phase"], job["phase"] in jobs.LIVE_PHASES, stage="stage1", step=2,
                              stage_steps=6, finished=("victim",), stage_totals={"victim": 10, "stage1": 6})

    def cancel(runs_root, rid, grace=10.0):
        job["phase"], job["cancelled"] = "cancelled", job["cancelled"] + 1
        return status(runs_root, rid)
    monkeypatch.setattr(jobs, "job_status", status)
    monkeypatch.setattr(jobs, "list_jobs", lambda runs_root: [status(runs_root, run_id)])
    monkeypatch.setattr(jobs, "cancel", cancel)
    return run_id, job


def test_cancel_confirms_the_stop_and_offers_to_resume(tmp_path, monkeypatch, launched, fake_job):
    run_id, job = fake_job
    at = app(tmp_path, monkeypatch, "run")
    assert f"Running: {run_id}" in texts(at.subheader)
    assert "Stopped." not in texts(at.info)
    (cancel,) = [b for b in at.button if b.label == "Cancel"]
    cancel.click().run()
    assert job["cancelled"] == 1
    assert f"Running: {run_id}" not in texts(at.subheader) and f"Ended: {run_id}" in texts(at.subheader)
    assert "Stopped. The run keeps its finished stages (victim); resume it here." in texts(at.info)
    at.button(key=f"resume-{run_id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert launched == [{"cfg": load_config("micro"), "root": tmp_path, "resume": run_id}]


def test_a_job_cancelled_elsewhere_is_not_announced_as_stopped_here(tmp_path, monkeypatch, fake_job):
    run_id, job = fake_job
    job["phase"] = "cancelled"  # ended before this session saw it running: it is in the stored runs
    at = app(tmp_path, monkeypatch, "run")
    assert "Stopped." not in texts(at.info) and f"Ended: {run_id}" not in texts(at.subheader)
