"""The page in a real browser: generate on the bundled zoo, Share, open the link in a fresh
browser context (no cookies, no session) and find the same controls and images; a ``?recipe=``
link and broken links likewise. Uses a Chromium already on the machine; never downloads one."""

import os
import re
import shutil
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from composer.recipe import parse
from composer.sharing.links import recipe_link
from composer.sharing.pnginfo import read_recipe
from ui.page import build, launch_options

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


def chromium_path() -> str | None:
    """A system Chromium, else a browser Playwright installed earlier (``playwright install``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    with sync_api.sync_playwright() as p:
        bundled = p.chromium.executable_path
    return bundled if Path(bundled).is_file() else None


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine (system or Playwright's); none is downloaded")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """The app on a free port, sharing into a fresh data folder."""
    previous = os.environ.get("COMPOSER_DATA")
    os.environ["COMPOSER_DATA"] = str(tmp_path_factory.mktemp("share-data"))
    demo = build().demo
    demo.queue()
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=None,
        quiet=True,
        **launch_options(),
    )
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()
        if previous is None:
            os.environ.pop("COMPOSER_DATA")
        else:
            os.environ["COMPOSER_DATA"] = previous


def fresh_page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    return context, context.new_page()


def gallery_pngs(page, count: int) -> list[bytes]:
    """The PNG files the Results gallery shows, fetched as the browser fetches them."""
    images = page.locator("#results img")
    expect(images).to_have_count(count, timeout=60_000)
    return [page.request.get(images.nth(k).get_attribute("src")).body() for k in range(count)]


def pixels(png: bytes) -> bytes:
    with Image.open(BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


def test_a_share_link_opens_the_same_generation_in_a_fresh_browser(browser, base_url):
    context, page = fresh_page(browser)
    page.goto(base_url)
    page.get_by_role("tab", name="Superpose").click()
    page.get_by_label("AND: both at once (equal densities)").check()
    page.get_by_label("Prompt (empty: main prompt)").nth(1).fill("a circle")
    page.get_by_label("Prompt", exact=True).fill("a red shape")
    page.get_by_label("number input for Steps").fill("4")
    page.get_by_label("number input for Images").fill("2")
    page.get_by_label("number input for Images").press("Enter")
    page.get_by_role("button", name="Generate", exact=True).click()
    made = gallery_pngs(page, 2)
    page.get_by_role("button", name="Share", exact=True).click()
    expect(page.locator("#share-link textarea")).to_have_value(
        re.compile(rf"{re.escape(base_url)}/\?id=[A-Za-z0-9_-]{{12}}"), timeout=30_000
    )
    link = page.locator("#share-link textarea").input_value()
    context.close()

    context, page = fresh_page(browser)
    page.goto(link)
    # The page fills its controls from the link after it loads; on a busy 2-core machine that
    # has taken more than the default 5 s.
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red shape", timeout=30_000)
    expect(page.get_by_role("tab", selected=True)).to_have_text("Superpose")
    expect(page.get_by_label("AND: both at once (equal densities)")).to_be_checked()
    expect(page.get_by_label("Prompt (empty: main prompt)").nth(1)).to_have_value("a circle")
    expect(page.get_by_label("number input for Steps")).to_have_value("4")
    expect(page.get_by_text("Shared generation")).to_be_visible()
    shown = gallery_pngs(page, 2)
    assert shown == made  # the stored files themselves, not images made again
    recipe = read_recipe(BytesIO(shown[1]))
    assert (recipe.method, recipe.superpose.mode) == ("superpose", "and")
    assert (recipe.sampler.seed, recipe.sampler.batch_size) == (0, 2)  # its batch: seeds 0, 1

    page.get_by_role("button", name="Re-run").click()
    expect(page.get_by_text(re.compile(r"2 image\(s\) in one batch, [\d.]+ s on "))).to_be_visible(
        timeout=60_000
    )
    again = gallery_pngs(page, 2)
    assert [pixels(p) for p in again] == [pixels(p) for p in made]
    context.close()


def test_a_recipe_link_sets_the_controls_in_a_fresh_browser(browser, base_url):
    recipe = parse(
        {
            "prompt": "merged shapes",
            "method": "merge",
            "experts": [{"model": "toy-warm", "weight": 0.7}, {"model": "toy-cool", "weight": 0.3}],
            "merge": {"method": "dare_ties", "base": "toy-base", "density": 0.35, "lambda": 1.25},
            "sampler": {"steps": 3, "seed": 5, "num_images": 1},
        }
    )
    context, page = fresh_page(browser)
    page.goto(recipe_link(base_url, recipe))
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("merged shapes", timeout=30_000)
    expect(page.get_by_role("tab", selected=True)).to_have_text("Merge")
    expect(page.get_by_label("Method", exact=True)).to_have_value("dare_ties")
    expect(page.get_by_label("number input for Density (kept fraction)")).to_have_value("0.35")
    expect(page.get_by_label("number input for λ (task scale)")).to_have_value("1.25")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("5")
    page.get_by_role("button", name="Re-run").click()
    expect(page.get_by_text(re.compile(r"1 image\(s\), [\d.]+ s on "))).to_be_visible(
        timeout=60_000
    )
    (made,) = gallery_pngs(page, 1)
    assert read_recipe(BytesIO(made)) == recipe
    context.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("id=../x", "share id: '../x' is not accepted"),
        ("id=AAAAAAAAAAAA", "no shared generation has the id 'AAAAAAAAAAAA'"),
        ("recipe=" + "A" * 4001, "the value has 4001 characters; at most 4000"),
        ("recipe=eNqrVg", "cut short"),
    ],
    ids=["path-like id", "unknown id", "recipe too long", "recipe cut short"],
)
def test_a_link_that_cannot_be_opened_says_why_on_the_page(browser, base_url, query, message):
    context, page = fresh_page(browser)
    page.goto(f"{base_url}/?{query}")
    expect(page.get_by_text("This link cannot be opened")).to_contain_text(message, timeout=30_000)
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red circle")
    expect(page.get_by_role("button", name="Re-run")).to_be_hidden()
    context.close()
