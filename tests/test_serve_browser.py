"""The chat page at GET / in a real headless browser (Debian's chromium + chromium-driver, driven
by Selenium): load it, give the API key, type a message, and watch a streamed reply appear."""

from __future__ import annotations

import os
import shutil
import tempfile

import httpx
import pytest
from serve_util import KEY, LiveServer, make_checkpoint

from src.tools.serve import make_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER) and not os.environ.get("CI"):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium "
                "chromium-driver); CI installs them and runs this test", allow_module_level=True)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("page") / "page_final.pt", block_size=128,
                              name="page")
    server = LiveServer(make_app(path, api_key=KEY, device="cpu", log=lambda *a: None))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and DRIVER, "CI must have chromium and chromium-driver (see .ci/run)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="slm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_typed_message_gets_a_streamed_reply(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live.url + "/")
    key = browser.find_element(By.ID, "key")
    key.send_keys(KEY)
    key.send_keys(Keys.TAB)  # 'change': the page asks /v1/models with the key
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "model").text == "page")
    for field, value in (("temperature", "0"), ("max-tokens", "40")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "input").send_keys("Hello, model!", Keys.ENTER)

    reply = WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert user.get_attribute("textContent") == "Hello, model!"
    shown = reply.get_attribute("textContent")
    assert int(reply.get_attribute("data-chunks")) > 1  # it arrived in pieces, as a stream
    # the same request, not streamed, gives the text the page showed
    same = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "page", "temperature": 0, "max_tokens": 40,
                            "messages": [{"role": "user", "content": "Hello, model!"}]})
    assert shown and shown == same.json()["choices"][0]["message"]["content"]

    browser.find_element(By.ID, "key").clear()  # a wrong key: the error is shown, not a reply
    browser.find_element(By.ID, "key").send_keys("wrong")
    browser.find_element(By.ID, "input").send_keys("again", Keys.ENTER)
    err = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.error"))
    assert "API key" in err.get_attribute("textContent")
