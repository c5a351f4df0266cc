"""The real LM's Live demo end to end in a real browser (its own file, so that pytest-xdist's
--dist loadfile runs it beside test_app_e2e.py rather than after it): `streamlit run` with the
waiting job process on, headless Chromium through Playwright. Skipped, with the reason, only where
Chromium or Playwright is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import browser_wait_context, screenshots_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "app"))
from serve import CHROMIUM, CHROMIUM_FLAGS, streamlit_server  # noqa: E402

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian's `chromium` package; `make test` installs it where it may)",
                allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def test_the_real_lm_demo_is_ready_from_its_shipped_backdoor_and_one_click_reaches_the_headline(tmp_path, monkeypatch):
    """The page's default, the real LM (SmolLM2-135M on real reviews): its backdoor for "cf" is
    loaded from the shipped adapter, not trained, so the page says "Ready" once the waiting process
    has loaded it and run the contrast; one click then reaches the headline and the verdict. The
    preset is live-smollm2 with a few steps per stage (the page is what is tested; the timing is
    bench/app_live_demo.py's) and 10 test reviews, with its victim's settings, so the shipped adapter
    still fits."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "live-smollm2.yaml").read_text())
    # the defense's stages on 4 rows a step: the defense is not part of the victim's fingerprint
    data["defense"].update(stage1_steps=2, stage2_steps=2, baselines=["clean_ft"], batch_size=4)
    data["task"].update(test_size=10)  # what it is scored on: not part of it either
    data["train"].update(threads=1)  # beside the other test worker on 2 cores; nor is this
    data["eval"].update(projections=["pca"], probe_per_group=4, head_probe=4, curve_examples=10)
    preset = tmp_path / "live-smollm2-short.yaml"
    preset.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("LOCPHYLAX_LIVE_PRESET", str(preset))
    monkeypatch.setenv("LOCPHYLAX_STANDBY", "1")  # the waiting job process that plants ahead
    runs = tmp_path / "runs"
    log = tmp_path / "streamlit.log"
    with streamlit_server(runs, log=log) as url, playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        page.get_by_text("A real pretrained language model (SmolLM2").first.wait_for(state="attached", timeout=60_000)
        try:
            page.get_by_text("Ready: the backdoor “cf” is planted.").wait_for(timeout=420_000)
        except playwright_sync.TimeoutError:
            pytest.fail(f"the shipped backdoor was not ready in 7 minutes\n{browser_wait_context(page, log)}")
        (prepared,) = [d for d in runs.iterdir() if (d / "state.json").is_file()]
        assert '"shipped_victim": "live-smollm2-cf"' in (prepared / "state.json").read_text(), \
            "the victim was trained, not loaded from its shipped adapter"
        page.get_by_role("button", name="Run the live demo").click()
        try:
            page.get_by_text("In one sentence:").wait_for(timeout=420_000)
        except playwright_sync.TimeoutError:
            pytest.fail(f"no headline in 7 minutes after the click\n{browser_wait_context(page, log)}")
        page.get_by_text("How often the hidden trigger “cf” still works").wait_for(timeout=60_000)
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(screenshots_dir() / "live_demo_real_lm.png"), full_page=True)
        browser.close()
