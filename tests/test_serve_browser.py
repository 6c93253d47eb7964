"""The web page of serve.py, in a real headless browser: Debian's chromium, driven by selenium through chromedriver.

The test starts serve.py on a tiny checkpoint, fills the form, and follows a request through the progress bar, the
row-by-row previews and the final grid and download links; then it checks that a refused request shows the server's
message, and that the Cancel button stops a request. A screenshot of the finished page is kept in
tests/artifacts/serve-page.png.

Without /usr/bin/chromium or /usr/bin/chromedriver the test is skipped, unless DALLE_ENGINE_REQUIRE_BROWSER=1 (as
`make test` sets), which makes a missing browser a failure."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_generate import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if not missing:
        return
    reason = f"browser test needs {' and '.join(missing)} (`make install` installs them)"
    if os.environ.get("DALLE_ENGINE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; DALLE_ENGINE_REQUIRE_BROWSER=1 makes this a failure")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """serve.py on a free port, once /api/info answers; its output goes to a log shown if it fails to start."""
    import httpx

    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--dalle_path", str(ckpt), "--device", "cpu",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve.py exited with status {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/api/info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve.py did not answer /api/info in 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,1200", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium must never try to download a browser or a driver
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


# Records every value the progress bar shows and every preview image the page puts up, however briefly: on the tiny
# model a whole request takes a fraction of a second, faster than the test could poll.
WATCH = """
window.seen = {progress: [], previews: []};
new MutationObserver((records) => {
  for (const r of records) {
    if (r.attributeName === "aria-valuenow") window.seen.progress.push(Number(r.target.getAttribute("aria-valuenow")));
    if (r.attributeName === "src" && r.target.src.startsWith("data:image/png")) window.seen.previews.push(r.target.src);
  }
}).observe(document.body, {attributes: true, attributeFilter: ["aria-valuenow", "src"], subtree: true});
"""


# The grid and every image shown have loaded.
LOADED = """
const images = [document.getElementById("grid"), ...document.querySelectorAll("#previews img")];
return images.length > 1 && images.every((img) => img.complete && img.naturalWidth > 0);
"""


CANCEL_ON_PROGRESS = """
const bar = document.getElementById("progress");
new MutationObserver((records, observer) => {
  if (Number(bar.getAttribute("aria-valuenow")) > 0) {
    observer.disconnect();
    document.getElementById("cancel").click();
  }
}).observe(bar, {attributes: true, attributeFilter: ["aria-valuenow"]});
"""


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_follows_a_request_shows_a_refusal_and_cancels(server, browser):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = browser, WebDriverWait(browser, 30)

    def field(name):
        return driver.find_element(By.ID, name)

    driver.get(server)
    wait.until(lambda d: field("generate").is_enabled())  # /api/info has been read
    info = httpx.get(f"{server}/api/info").json()
    assert field("num_images").get_attribute("value") == str(info["defaults"]["num_images"])
    assert field("cond_scale").get_attribute("placeholder") == str(info["defaults"]["cond_scale"])
    assert not field("cancel").is_displayed() and field("error").text == ""

    driver.execute_script(WATCH)
    field("prompt").send_keys("a red cube\na blue ball")
    field("num_images").clear()
    field("num_images").send_keys("2")
    field("seed").send_keys("3")
    field("generate").click()
    wait.until(lambda d: d.execute_script(LOADED))

    seen = driver.execute_script("return window.seen")
    progress = seen["progress"]
    assert progress[-1] == 100 and field("progress").get_attribute("aria-valuenow") == "100"
    assert any(0 < v < 100 for v in progress), progress  # the bar moved on its way
    assert progress == sorted(progress)
    assert seen["previews"], "no preview image appeared"
    assert "Done" in field("status").text and "seed 3" in field("status").text
    assert not field("cancel").is_displayed()
    images = driver.find_elements(By.CSS_SELECTOR, "#previews img")
    assert len(images) == 4
    assert all(driver.execute_script("return arguments[0].naturalWidth", img) == info["image_size"] for img in images)

    links = driver.find_elements(By.CSS_SELECTOR, "#downloads a")
    assert len(links) == 1 + 4  # the grid and each image
    grid = field("grid").get_attribute("src")
    assert links[0].get_attribute("href") == grid and grid.endswith("/grid.png")
    for link in links:
        assert link.get_attribute("download")
        response = httpx.get(link.get_attribute("href"))
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG")
    assert console_errors(driver) == []
    ARTIFACTS.mkdir(exist_ok=True)
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, driver.execute_script("return document.documentElement.scrollHeight") + 140)
    driver.save_screenshot(str(ARTIFACTS / "serve-page.png"))  # the whole page: the form, the images, the grid

    # A refused request: the server's message is shown, and what the last request made stays on the page.
    field("num_images").clear()
    field("num_images").send_keys("0")
    field("generate").click()
    wait.until(lambda d: field("error").text != "")
    assert "num_images" in field("error").text and "got 0" in field("error").text
    assert field("generate").is_enabled() and field("grid").get_attribute("src") == grid
    # chromium logs the 400 itself as a failed resource load; anything else would be a fault of the page
    assert [m for m in console_errors(driver) if "status of 400" not in m] == []

    # Cancel, clicked as soon as the bar first moves, on a request too long to end before the click reaches the server.
    field("prompt").clear()
    field("prompt").send_keys("a green cone")
    field("num_images").clear()
    field("num_images").send_keys(str(info["max_images_per_request"]))
    driver.execute_script(CANCEL_ON_PROGRESS)
    field("generate").click()
    wait.until(lambda d: field("status").text.startswith("Cancelled"))
    assert field("error").text == "" and not field("cancel").is_displayed() and field("generate").is_enabled()
    assert int(field("progress").get_attribute("aria-valuenow")) < 100
