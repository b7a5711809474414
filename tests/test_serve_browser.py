"""The search page in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run` installs) against
`moon-rl serve` on a free localhost port. A text query typed into the box, a photo picked in the drop zone, and
"more like this": each must render its result images (loaded, with pixels), in the order the API returns.

Screenshots are written to the test's tmp folder (and to `$MOON_RL_SCREENSHOTS` when set, for a person to look at).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="moon-rl serve needs the serve extra (fastapi, uvicorn, python-multipart)")
import uvicorn  # noqa: E402

from moon_rl.data.sources import resolve_image_path  # noqa: E402
from moon_rl.serve import create_app  # noqa: E402
from tests.browser import Browser, find_chromium  # noqa: E402
from tests.helpers import free_port, served_index  # noqa: E402

pytestmark = pytest.mark.slow

# Every image the grid shows has loaded and has pixels (the page's own check, confirmed here from the DOM).
RENDERED = """(() => {
  const imgs = [...document.querySelectorAll('#results .card img')];
  return {state: document.body.dataset.state, status: document.getElementById('status').textContent,
          loaded: Number(document.body.dataset.imagesLoaded || -1), cards: document.querySelectorAll('.card').length,
          drawn: imgs.filter((img) => img.complete && img.naturalWidth > 0).length,
          ids: [...document.querySelectorAll('.card')].map((card) => card.dataset.id),
          chainShown: !document.getElementById('chain').hidden};
})()"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, synthetic_catalogue):
    index_dir, _, catalogue = served_index(tmp_path_factory.mktemp("browser"), synthetic_catalogue(24, 0, 56))
    config = uvicorn.Config(create_app(index_dir), host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}", catalogue
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def browser(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary found (apt-get install chromium, or set CHROMIUM); .ci/run installs it")
    browser = Browser(binary, tmp_path / "profile")
    yield browser
    browser.close()


def api_search(base: str, **body) -> list[str]:
    request = urllib.request.Request(f"{base}/search", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [hit["id"] for hit in json.load(response)["results"]]


def rendered(browser: Browser, status_part: str) -> dict:
    """Wait for the page to finish the search whose status line names `status_part`; what it shows."""
    browser.wait_for(f"['rendered', 'error'].includes(document.body.dataset.state) && "
                     f"document.getElementById('status').textContent.includes({json.dumps(status_part)})")
    return browser.evaluate(RENDERED)


def keep(path: Path) -> None:
    if os.environ.get("MOON_RL_SCREENSHOTS"):
        folder = Path(os.environ["MOON_RL_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)


def test_text_and_image_queries_render_their_product_images(server, browser, tmp_path):
    base, catalogue = server
    product = next(iter(catalogue.products.values()))
    browser.goto(f"{base}/")
    browser.wait_for("document.body.dataset.ready === 'true'")
    assert "products" in browser.evaluate("document.getElementById('info').textContent")

    # A text query, typed and submitted with Enter.
    browser.evaluate("document.getElementById('q').focus()")
    browser.type_text(product.title)
    browser.press_enter()
    shown = rendered(browser, product.title)
    assert shown["state"] == "rendered", shown["status"]
    assert shown["cards"] == 12 and shown["loaded"] == 12 and shown["drawn"] == 12, shown
    assert shown["ids"] == api_search(base, text=product.title, k=12)
    text_shot = browser.screenshot(tmp_path / "serve-text-query.png")
    assert text_shot.stat().st_size > 10_000  # a page with pictures, not a blank one
    keep(text_shot)

    # An image query: the text box emptied, a product photo picked in the drop zone (its file input).
    browser.evaluate("document.getElementById('q').value = ''")
    photo = resolve_image_path(product.images[0], catalogue.base_dir)
    browser.choose_file("#file", photo)
    shown = rendered(browser, "the photo")
    assert shown["state"] == "rendered", shown["status"]
    assert shown["loaded"] == shown["cards"] == shown["drawn"] == 12, shown
    assert browser.evaluate("document.getElementById('preview').naturalWidth") > 0  # the query photo is shown too
    import base64

    assert shown["ids"] == api_search(base, image=base64.b64encode(photo.read_bytes()).decode(), k=12)
    keep(browser.screenshot(tmp_path / "serve-image-query.png"))

    # "More like this" on the second result: that product comes back first.
    second = shown["ids"][1]
    browser.evaluate(f"document.querySelector('.card[data-id=\"{second}\"] a.more').click()")
    shown = rendered(browser, f"more like {second}")
    assert shown["state"] == "rendered" and shown["ids"][0] == second and shown["drawn"] == shown["cards"], shown
    assert browser.evaluate("document.getElementById('preview').hidden && document.getElementById('q').value === ''")
    keep(browser.screenshot(tmp_path / "serve-more-like-this.png"))


def test_reason_mode_shows_the_chain_and_errors_show_the_message(server, browser):
    base, _ = server
    browser.goto(f"{base}/?q=red+striped+cotton+shirt")
    shown = rendered(browser, "red striped cotton shirt")
    assert shown["state"] == "rendered" and shown["drawn"] == shown["cards"] == 12 and not shown["chainShown"]
    browser.evaluate("document.getElementById('mode').value = 'reason'; document.getElementById('go').click()")
    browser.wait_for("document.getElementById('status').textContent.includes('reason mode')")
    assert browser.evaluate(RENDERED)["chainShown"]
    assert browser.evaluate("document.getElementById('chain-text').textContent.length") > 0
    # A product the index does not know: the API's message on the page, and no stale "rendered" state.
    browser.evaluate("location.hash = 'more=no-such-product'")
    browser.wait_for("document.body.dataset.state === 'error'")
    assert "404: unknown product id 'no-such-product'" in browser.evaluate("document.getElementById('status').textContent")
