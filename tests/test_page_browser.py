"""The page as a newcomer uses it, in a real browser (issue 21): Stop ends a slow run within
2 s and the next run works; a PNG made elsewhere leaves every control as it was, with no "Error"
badge; the κ plot's legend is inside its box; each tab's examples set a configuration that
generates. Uses a Chromium already on the machine; never downloads one."""

import io
import time

import pytest
from PIL import Image

from tests.test_share_browser import browser, chromium_path  # noqa: F401  (the shared fixture)
from ui.page import build, launch_options

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("COMPOSER_DATA", str(tmp_path_factory.mktemp("page-data")))
    demo = build().demo
    demo.queue()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None,
                quiet=True, **launch_options())  # fmt: skip
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def page(browser, base_url):  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(base_url)
    expect(page.locator("#generate")).to_be_visible(timeout=30_000)
    yield page
    context.close()


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")


def status(page) -> str:
    return page.locator("#status").inner_text()


def idle(page) -> None:
    """No event is pending: Gradio's progress text ("processing" or a step count) is gone."""
    for part in ("#status", "#results"):
        expect(page.locator(part)).not_to_contain_text("processing", timeout=1_000)


def test_stop_returns_the_page_to_idle_within_2_s_and_the_next_run_works(page):
    set_number(page, "Steps", 150)
    set_number(page, "Images", 16)
    set_number(page, "Width (0 = model's own)", 128)
    set_number(page, "Height (0 = model's own)", 128)
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("processing", timeout=5_000)
    time.sleep(3)  # well inside the run
    expect(page.locator("#status")).to_contain_text("processing")
    stopped = time.perf_counter()
    page.locator("#stop").click()
    expect(page.locator("#status")).to_contain_text("Stopped after", timeout=2_000)
    assert time.perf_counter() - stopped < 2.5
    assert " of 2400 steps" in status(page)
    idle(page)
    set_number(page, "Steps", 4)
    set_number(page, "Images", 1)
    set_number(page, "Width (0 = model's own)", 0)
    set_number(page, "Height (0 = model's own)", 0)
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("1 image(s)", timeout=30_000)
    expect(page.locator("#results img")).to_have_count(1)


def test_a_size_far_above_the_models_own_asks_first(page):
    set_number(page, "Width (0 = model's own)", 512)
    set_number(page, "Height (0 = model's own)", 512)
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("256× the pixels of toy-warm's own 32×32")
    expect(page.locator("#status")).to_contain_text("Allow large sizes")


def foreign_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_foreign_png_leaves_every_control_as_it_was_without_error_badges(page):
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a yellow square")
    drop = page.locator("input[type=file]").last
    drop.set_input_files({"name": "elsewhere.png", "mimeType": "image/png",
                          "buffer": foreign_png()})  # fmt: skip
    expect(page.locator("#status")).to_contain_text("carries no", timeout=10_000)
    time.sleep(0.5)
    assert page.get_by_text("Error", exact=True).count() == 0
    assert page.locator(".error").count() == 0
    expect(prompt).to_have_value("a yellow square")


def test_the_kappa_legend_names_each_expert_inside_its_box(page):
    page.get_by_role("tab", name="Superpose").click()
    page.get_by_role("button", name="AND: a red shape and a circle").click()
    expect(page.locator("#status")).to_contain_text("Example set")
    page.locator("#generate").click()
    legend = page.locator("#kappa-plot .role-legend")
    expect(legend).to_be_visible(timeout=60_000)
    expect(legend).to_contain_text("toy-warm")
    expect(legend).to_contain_text("a circle")
    inner, outer = legend.bounding_box(), page.locator("#kappa-plot").bounding_box()
    assert outer["x"] <= inner["x"] and inner["x"] + inner["width"] <= outer["x"] + outer["width"]
    assert outer["y"] <= inner["y"] and inner["y"] + inner["height"] <= outer["y"] + outer["height"]


def test_the_aggregate_example_sets_a_working_configuration(page):
    page.get_by_role("tab", name="Aggregate").click()
    page.get_by_role("button", name="a red circle and a blue square (toy-warm-cool, 64×32)").click()
    expect(page.locator("#status")).to_contain_text("Example set")
    expect(page.get_by_label("number input for Width (0 = model's own)")).to_have_value("64")
    page.locator("#generate").click()
    images = page.locator("#results img")
    expect(images).to_have_count(1, timeout=60_000)
    png = page.request.get(images.first.get_attribute("src")).body()
    assert Image.open(io.BytesIO(png)).size == (64, 32)
    expect(page.locator("#maps img")).to_be_visible(timeout=30_000)
    expect(page.locator("#maps-caption")).to_contain_text("expert 2: toy-cool")


def test_the_comparison_grid_makes_a_labelled_picture_of_the_right_size(page):
    from composer.grid import grid_size

    page.get_by_role("tab", name="Merge").click()
    page.get_by_role("button", name="TIES of toy-warm and toy-cool").click()
    expect(page.locator("#status")).to_contain_text("Example set")
    set_number(page, "Steps", 4)
    set_number(page, "Images", 1)
    page.get_by_role("button", name="Comparison grid").click()
    page.locator("#grid-x textarea").fill("merge.density=0.2,0.8")
    page.locator("#grid-y textarea").fill("sampler.seed=1,2")
    page.locator("#grid-go").click()
    expect(page.locator("#status")).to_contain_text("Grid of 4 cells", timeout=60_000)
    picture = page.locator("#grid-picture img")
    expect(picture).to_be_visible()
    png = page.request.get(picture.get_attribute("src")).body()
    assert Image.open(io.BytesIO(png)).size == grid_size(2, 2, (32, 32), titled_rows=True)


def test_uploads_above_the_limit_are_refused_before_they_reach_the_disk(base_url):
    """Issue 20, item 6: the page used to accept a 200 MB upload (``max_file_size: null``)."""
    import httpx

    from ui.page import MAX_UPLOAD

    assert MAX_UPLOAD == "20mb"
    url = f"{base_url}/gradio_api/upload"
    big = httpx.post(url, files={"files": ("big.png", b"\0" * (21 * 1024 * 1024))}, timeout=60)
    assert big.status_code == 413, big.text[:200]
    small = httpx.post(url, files={"files": ("small.png", b"\0" * 1024)}, timeout=60)
    assert small.status_code == 200


def test_the_page_offers_exactly_its_documented_endpoints_as_mcp_tools(base_url):
    """Issue 21, point 8: with the ``mcp`` package the page is an MCP server whose tools are the
    documented endpoints, named and described, not the page's internal events."""
    import httpx

    pytest.importorskip("mcp", reason="the mcp package is not installed")
    tools = httpx.get(f"{base_url}/gradio_api/mcp/schema", timeout=30).json()
    assert sorted(t["name"] for t in tools) == ["export_merge", "generate", "link_recipe"]
    generate = next(t for t in tools if t["name"] == "generate")
    assert "recipe" in generate["description"]
