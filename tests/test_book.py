"""The HTML book: it builds with warnings as errors, and every page works in a real browser.

The build executes every notebook in the mode nbval uses ($ORGANICS_MODE, quick by default) into
`_build/book-<mode>` (its execution cache survives between runs); a notebook that passed under nbval
earlier in the same session is taken from that cache instead, with the outputs of nbval's run
(tests/notebook_reuse.py). The pages are then served on 127.0.0.1 and opened in headless Chromium
(Debian's `chromium` and `chromium-driver`, which `install.sh` installs): no console errors, every
equation typeset by the book's own MathJax, every figure drawn, every chapter reachable from the
navigation. A screenshot of each page lands in `_build/screenshots/`.
"""

import base64
import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import urlopen

import numpy as np
import pytest
from book_pages import ROOT, book_config, source_of, toc_documents
from notebook_reuse import BUILD_DIR, current_key, stored_notebooks
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from organics.experiments import EXPERIMENTS
from organics.train import parse_args

MODE = os.environ.get("ORGANICS_MODE", "quick")
SCREENSHOT_DIR = ROOT / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]
DOCUMENTS = toc_documents()
NOTEBOOK_DOCUMENTS = [document for document in DOCUMENTS if source_of(document).suffix == ".ipynb"]

# The build executes the notebooks nbval did not pass in this session (all of them when test_book.py
# runs alone): allow it the whole notebook budget.
BUILD_TIMEOUT = 2400
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 300)


@pytest.fixture(scope="module")
def html_dir() -> Path:
    """Build the book (`jupyter-book build -W -n --keep-going --all`) and return its HTML folder."""
    jupyter_book = shutil.which("jupyter-book")
    assert jupyter_book, "jupyter-book is not installed: run `bash install.sh`"
    command = [jupyter_book, "build", str(ROOT), "--path-output", str(BUILD_DIR), "--all", "-W", "-n", "--keep-going"]
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # The notebooks import `organics` from this checkout, whatever else is installed.
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"ORGANICS_MODE": MODE, "PYTHONPATH": python_path}
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` took longer than {BUILD_TIMEOUT} s", pytrace=False)
    log = result.stdout + result.stderr
    (BUILD_DIR / "build.log").write_text(log)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{log[-6000:]}", pytrace=False)
    return BUILD_DIR / "_build" / "html"


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the HTML folder; records every request answered with an error instead of logging it."""

    failures: list[str]

    def log_request(self, code="-", size="-"):
        if int(code) >= 400:
            self.failures.append(f"{code} {self.path}")

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def server(html_dir):
    """The built book served on a free port of 127.0.0.1: yields (base URL, failed requests)."""
    failures: list[str] = []
    handler = type("BookHandler", (QuietHandler,), {"failures": failures})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(html_dir)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", failures
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by chromedriver, with a fresh profile and the console log recorded."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run `bash install.sh` (Debian's chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    shutil.rmtree(SCREENSHOT_DIR, ignore_errors=True)  # this run's screenshots only
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, url: str) -> list[dict]:
    """Load `url`, wait until MathJax (if the page has math) has typeset it, return the console log."""
    driver.get_log("browser")
    driver.get(url)
    driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const settle = () => window.MathJax && MathJax.startup && MathJax.startup.promise
            ? MathJax.startup.promise.then(() => done(true), (error) => done(String(error)))
            : done(false);
        document.readyState === "complete" ? settle() : window.addEventListener("load", settle);
        """
    )
    return driver.get_log("browser")


def save_screenshot(driver, document: str) -> Path:
    """A PNG of the whole page (up to 16000 CSS px tall) in _build/screenshots/.

    The viewport is stretched to the page's height for the capture: Chromium's `captureBeyondViewport`
    re-lays out the theme's sticky sidebars and shifts the article out of the picture.
    """
    width, height = driver.execute_script("return [window.innerWidth, document.documentElement.scrollHeight]")
    metrics = {"width": width, "height": min(height, 16000), "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path = SCREENSHOT_DIR / f"{document.replace('/', '__')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def pixel_spread(data: bytes) -> float:
    """Standard deviation of the grey levels of an image (0 for a blank one), transparency on white."""
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("L")
    return float(np.asarray(flat, dtype=float).std())


def page_path(base: str, href: str) -> str:
    """The path of a link relative to the site root, without query or fragment."""
    return urlsplit(href).path.removeprefix(urlsplit(base).path)


def follow(driver, link) -> None:
    """Click `link` and wait until the page it leads to has loaded."""
    previous = driver.current_url
    link.click()
    WebDriverWait(driver, 30).until(
        lambda d: d.current_url != previous and d.execute_script("return document.readyState") == "complete"
    )


def test_every_page_is_built(html_dir):
    assert (html_dir / "index.html").exists()
    for document in DOCUMENTS:
        assert (html_dir / f"{document}.html").exists(), document


def test_build_reuses_the_notebooks_nbval_executed(html_dir, request):
    """The notebooks that passed under nbval earlier in this session come from the execution cache
    (tests/notebook_reuse.py stored them there): the build executed none of them again."""
    stored = stored_notebooks(request.config)
    if not stored:
        pytest.skip("no notebook passed under nbval in this session: the build executed them")
    log = re.sub(r"\x1b\[[0-9;]*m", "", (BUILD_DIR / "build.log").read_text())
    reused = set(re.findall(r"^(.+\.ipynb): Using cached notebook", log, flags=re.MULTILINE))
    again = sorted(str(path) for path in stored if str(path) not in reused)
    if again and set(stored.values()) != {current_key()}:
        pytest.skip("organics/, results/ or $ORGANICS_MODE changed since nbval ran: the build executed again")
    assert not again, f"the build executed again notebooks nbval ran in this session: {again}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_page_renders_in_chromium(document, server, browser):
    base, failed_requests = server
    failed_requests.clear()
    console = open_page(browser, urljoin(base, f"{document}.html"))
    save_screenshot(browser, document)

    severe = [entry["message"] for entry in console if entry["level"] == "SEVERE"]
    assert not severe, f"console errors on {document}: {severe}"
    assert not failed_requests, f"requests that failed on {document}: {failed_requests}"

    external = browser.execute_script(
        "return [...document.querySelectorAll('script[src], link[rel=stylesheet], img')]"
        ".map(e => e.src || e.href).filter(u => !u.startsWith(location.origin))"
    )
    assert not external, f"{document} loads resources from outside the book: {external}"

    assert len(browser.find_elements(By.CSS_SELECTOR, "article h1")) == 1, "one top-level title per page"

    typeset, total, tex_errors = browser.execute_script(
        "const m = [...document.querySelectorAll('article .math')];"
        "return [m.filter(e => e.querySelector('mjx-container')).length, m.length,"
        " [...document.querySelectorAll('article mjx-merror')].map(e => e.getAttribute('data-mjx-error'))]"
    )
    assert typeset == total, f"{total - typeset} of {total} equations on {document} were not typeset"
    assert not tex_errors, f"MathJax TeX errors on {document}: {tex_errors}"

    images = browser.execute_script(
        "return [...document.querySelectorAll('article img')].map(i => [i.currentSrc, i.complete, i.naturalWidth])"
    )
    for src, complete, width in images:
        assert complete and width > 0, f"image {src} on {document} did not load"
        with urlopen(src) as response:
            assert pixel_spread(response.read()) > 2.0, f"image {src} on {document} is blank"

    raw_tables = browser.execute_script(
        "return [...document.querySelectorAll('article p')].map(p => p.textContent)"
        ".filter(t => /\\|\\s*:?-{3,}/.test(t))"
    )
    assert not raw_tables, f"{document} shows Markdown tables as raw text: {[t[:80] for t in raw_tables]}"

    sidebar = browser.find_elements(By.CSS_SELECTOR, "nav.bd-docs-nav a.reference.internal")
    reached = {page_path(base, link.get_attribute("href")) for link in sidebar}
    missing = {f"{doc}.html" for doc in DOCUMENTS} - reached
    assert not missing, f"the sidebar of {document} has no link to {sorted(missing)}"


REFERENCES = "book/references"


def test_citations_resolve_to_bibliography_entries(server, browser):
    """Every citation link of every page points at an entry that exists on the References page."""
    base, _ = server
    open_page(browser, urljoin(base, f"{REFERENCES}.html"))
    entries = set(browser.execute_script("return [...document.querySelectorAll('article [id]')].map(e => e.id)"))
    assert entries, "the References page lists no entry"
    cited = 0
    for document in DOCUMENTS:
        open_page(browser, urljoin(base, f"{document}.html"))
        links = browser.execute_script(
            "return [...document.querySelectorAll('article a[href]')].map(a => [a.href, a.textContent])"
        )
        for href, text in links:
            if page_path(base, href) == f"{REFERENCES}.html" and urlsplit(href).fragment:
                cited += 1
                assert urlsplit(href).fragment in entries, f"citation {text!r} on {document} points at no entry"
    assert cited > 0, "no page cites anything"


@pytest.mark.parametrize("document", NOTEBOOK_DOCUMENTS)
def test_figures_are_numbered(document, server, browser):
    """Every figure caption of a chapter starts with its number ("Fig. 3" ...)."""
    base, _ = server
    open_page(browser, urljoin(base, f"{document}.html"))
    captions = browser.execute_script(
        "return [...document.querySelectorAll('article figure figcaption, article .figure .caption')]"
        ".map(c => c.textContent.trim())"
    )
    for caption in captions:
        assert re.match(r"(Fig\.|Figure)\s*\d+(\.\d+)*", caption), f"unnumbered figure on {document}: {caption[:80]!r}"


def test_index_redirects_to_the_first_page(server, browser):
    base, _ = server
    browser.get(base)
    WebDriverWait(browser, 30).until(lambda driver: page_path(base, driver.current_url) == f"{DOCUMENTS[0]}.html")


def test_next_links_walk_through_the_book_in_order(server, browser):
    base, _ = server
    open_page(browser, urljoin(base, f"{DOCUMENTS[0]}.html"))
    visited = [page_path(base, browser.current_url)]
    while links := browser.find_elements(By.CSS_SELECTOR, "a.right-next"):
        follow(browser, links[0])
        visited.append(page_path(base, browser.current_url))
        assert len(visited) <= len(DOCUMENTS), f"the `next` links loop: {visited}"
    assert visited == [f"{document}.html" for document in DOCUMENTS]


@pytest.mark.parametrize("document", NOTEBOOK_DOCUMENTS)
def test_launch_buttons_open_the_notebook_on_binder_and_colab(document, server, browser):
    base, _ = server
    open_page(browser, urljoin(base, f"{document}.html"))
    repository = book_config()["repository"]
    owner_name = urlsplit(repository["url"]).path.strip("/")
    expected = {
        "Binder": f"https://mybinder.org/v2/gh/{owner_name}/{repository['branch']}?urlpath=lab/tree/{document}.ipynb",
        "Colab": f"https://colab.research.google.com/github/{owner_name}/blob/{repository['branch']}/{document}.ipynb",
    }
    links = {link.get_attribute("href") for link in browser.find_elements(By.CSS_SELECTOR, "a[href]")}
    for service, url in expected.items():
        assert url in links, f"no {service} launch button on {document} (expected {url})"


def test_reproducing_page_gives_valid_trainer_commands():
    """Every trainer command on the page parses, and every named run of organics.experiments is on it."""
    text = (ROOT / "book" / "reproducing.md").read_text()
    commands = re.findall(r"^python -m organics\.train (.+?)(?=\n(?!    )|\Z)", text, flags=re.MULTILINE | re.DOTALL)
    for command in commands:
        argv = shlex.split(command.replace("\\\n", " "))
        if argv != ["--list-experiments"]:
            assert parse_args(argv).out_dir.startswith("results/"), command
    for experiment in EXPERIMENTS.values():
        assert experiment.command() in text, f"reproducing.md lacks {experiment.command()}"


EXPLORERS = {  # the pages with static explorers (organics.explorer), and how many sliders each has
    "book/01_divisive_normalization.html": 2,  # sigma, pool weight
    "book/03_oscillators_energy.html": 2,  # input, tau_a / tau_y
    "book/04_two_dimensional.html": 2,  # w_r, z
}


@pytest.mark.parametrize("page", EXPLORERS)
def test_static_explorers_swap_frames(page, server, browser):
    """A chapter's explorer works without a kernel: moving a slider shows another inline frame."""
    base, _ = server
    console = open_page(browser, urljoin(base, page))
    (explorer,) = browser.find_elements(By.CSS_SELECTOR, "article .organics-explorer")
    image = explorer.find_element(By.CSS_SELECTOR, "svg image")
    sliders = explorer.find_elements(By.CSS_SELECTOR, "input[type=range]")
    assert len(sliders) == EXPLORERS[page]
    shown = {image.get_attribute("href")}
    for slider in sliders:
        label = explorer.find_element(By.CSS_SELECTOR, f"output[for='{slider.get_attribute('id')}']").text
        browser.execute_script(
            "const slider = arguments[0];"
            "slider.value = String((Number(slider.value) + 1) % (Number(slider.max) + 1));"
            "slider.dispatchEvent(new Event('input', {bubbles: true}));",
            slider,
        )
        src = image.get_attribute("href")
        assert src not in shown, "moving a slider did not change the frame"
        assert src.startswith("data:image/png;base64,") and pixel_spread(base64.b64decode(src.split(",", 1)[1])) > 2.0
        assert explorer.find_element(By.CSS_SELECTOR, f"output[for='{slider.get_attribute('id')}']").text != label
        shown.add(src)
    severe = [entry["message"] for entry in console + browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, f"console errors on {page}: {severe}"
