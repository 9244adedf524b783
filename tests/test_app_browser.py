"""The app in a real browser: `streamlit run` on a free port, Debian's Chromium through Playwright.

Checks what AppTest cannot: the page renders, the grid shows the planner's numbers, the CSV download
parses, and the address bar holds a link that reopens the same view. The screenshot goes to a temporary
folder; set UPDATE_README_SCREENSHOT=1 to refresh docs/screenshot.png.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from playwright.sync_api import expect, sync_playwright

from model.config import make_config
from planner.params import count_params

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_START_S = 60
PAGE_TIMEOUT_MS = 30_000  # a cold server imports pandas and the planner on its first page
expect.set_options(timeout=PAGE_TIMEOUT_MS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ready, log = threading.Event(), []

    def drain():  # keep reading so the server never blocks on a full pipe
        for line in server.stdout:
            log.append(line)
            if "You can now view" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(SERVER_START_S), "streamlit did not start:\n" + "".join(log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "the browser test needs Debian's chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_browser_grid_download_and_screenshot(app_url, browser, tmp_path, record_property):
    page = browser.new_page(viewport={"width": 1920, "height": 1080}, accept_downloads=True)
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    start = time.perf_counter()
    page.goto(app_url)
    grid = page.get_by_test_id("stDataFrame")
    expected = count_params(make_config("tiny", architecture="expert_only", num_experts=4)).total_params
    # The grid draws on a canvas; its accessible table carries each cell's exact value.
    expect(grid).to_contain_text(str(expected))
    record_property("first_render_s", round(time.perf_counter() - start, 2))

    page.wait_for_load_state("networkidle")  # fonts and the grid's canvas settled before the picture
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("UPDATE_README_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "screenshot.png").write_bytes(shot.read_bytes())

    with page.expect_download() as download:
        page.get_by_test_id("stDownloadButton").filter(has_text="CSV").first.get_by_role("button").click()
    rows = pd.read_csv(download.value.path(), comment="#")
    assert len(rows) == 50
    tiny = rows[(rows["size"] == "tiny") & (rows["architecture"] == "expert_only") & (rows["num_experts"] == 4)]
    assert list(tiny["total_params"]) == [expected]
    page.close()


def test_browser_address_bar_reopens_the_view(app_url, browser):
    page = browser.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(app_url + "?sizes=tiny&experts=0,8")
    top_k = page.get_by_label("Top-k K (experts per series or token)")
    top_k.fill("3")
    top_k.press("Enter")
    expect(page).to_have_url(re.compile(r"[?&]top_k=3(&|$)"))
    expected = count_params(make_config("tiny", architecture="token_ffn", num_experts=8, top_k=3)).active_params
    expect(page.get_by_test_id("stDataFrame")).to_contain_text(str(expected))

    shared = browser.new_page()
    shared.set_default_timeout(PAGE_TIMEOUT_MS)
    shared.goto(page.url)
    expect(shared.get_by_label("Top-k K (experts per series or token)")).to_have_value("3")
    expect(shared.get_by_test_id("stDataFrame")).to_contain_text(str(expected))
    page.close()
    shared.close()


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    """A full-page picture in the test's folder (docs/ too with UPDATE_README_SCREENSHOT=1), to look at."""
    page.wait_for_load_state("networkidle")
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=shot, full_page=True)
    if os.environ.get("UPDATE_README_SCREENSHOT") == "1":
        (ROOT / "docs" / f"{name}.png").write_bytes(shot.read_bytes())
    return shot


def test_browser_plan_grid_fits_1600_px_and_exact_values_show_whole(app_url, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    scroll_widths = "() => { const s = document.querySelector('[data-testid=stDataFrame] .dvn-scroller'); " \
                    "return [s.scrollWidth, s.clientWidth]; }"
    expected = count_params(make_config("tiny")).total_params
    page.goto(app_url)
    expect(page.get_by_test_id("stDataFrame")).to_contain_text(str(expected))
    page.wait_for_timeout(500)
    content, visible = page.evaluate(scroll_widths)
    assert content <= visible  # readable units: every column fits beside the open sidebar
    page.goto(app_url + "?exact=true")
    expect(page.get_by_test_id("stDataFrame")).to_contain_text(str(expected))
    assert _screenshot(page, tmp_path, "plan-exact-1600").stat().st_size > 10_000
    page.close()


def test_browser_charts_of_one_size_show_every_legend_item(app_url, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(app_url + "?sizes=small&tab=Charts")
    legend = page.locator(".legend .legendtext")
    expect(legend.filter(has_text="expert head")).to_have_count(1)
    expect(legend.filter(has_text="router")).to_have_count(1)
    for name in ("shared_then_expert", "expert_only", "token_ffn", "dense"):  # the architectures compared
        expect(legend.filter(has_text=name).first).to_be_visible()
    assert _screenshot(page, tmp_path, "charts-one-size").stat().st_size > 10_000
    page.close()


def test_browser_bad_share_link_is_named_and_dropped(app_url, browser):
    """Values Streamlit would crash on or silently replace: one warning each, gone from the address, the
    page drawn from the defaults and the good values kept."""
    page = browser.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(app_url + "?sizes=tiny&top_k=inf&batch_size=-3&experts=0,8")
    alerts = page.get_by_test_id("stAlert")
    expect(alerts.filter(has_text="top_k=inf is not allowed")).to_have_count(1)
    expect(alerts.filter(has_text="batch_size=-3 is not allowed")).to_have_count(1)
    expected = count_params(make_config("tiny", architecture="token_ffn", num_experts=8)).total_params
    expect(page.get_by_test_id("stDataFrame")).to_contain_text(str(expected))
    assert "top_k" not in page.url and "batch_size" not in page.url and "sizes=tiny" in page.url
    page.close()


def test_browser_cost_tab_prices_a_run(app_url, browser, tmp_path, monkeypatch):
    """The Cost tab opened from a link: a tiny model's run on 2 H100s, its cost the planner's."""
    from planner.cost.training import TrainingRun, price_training_run

    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    page.set_default_timeout(120_000)  # the server traces the step on first use
    page.goto(app_url + "?sizes=tiny&experts=0&tab=Cost&context_length=64&prediction_length=16&cost_gpu=h100-sxm"
              "&cost_devices=2&cost_global_batch=16&cost_steps=10000")
    expected = price_training_run(TrainingRun(make_config("tiny"), "h100-sxm", num_devices=2, per_device_batch=8,
                                              steps=10_000, context_length=64, prediction_length=16))
    expect(page.get_by_test_id("stMetric").filter(has_text="Cost")).to_contain_text(f"${expected.cost_usd:,.2f}",
                                                                                   timeout=120_000)
    expect(page.get_by_text("Where the step goes")).to_be_visible()
    page.screenshot(path=tmp_path / "cost.png", full_page=True)
    if os.environ.get("UPDATE_README_SCREENSHOT") == "1":
        (ROOT / "docs" / "cost-tab.png").write_bytes((tmp_path / "cost.png").read_bytes())
    page.close()
