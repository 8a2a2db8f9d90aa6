"""The built-in page at `/` in a real browser (Debian's headless chromium through
chromedriver): type a message, see the answer stream in, see the dashboard follow; a
screenshot is kept (BITNET_SCREENSHOT_DIR, else the system's temp folder)."""

import os
import shutil
import tempfile
import time

import pytest

from conftest import Server


def chromium():
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.environ.get("BITNET_SKIP_BROWSER") == "1":
        pytest.skip("SKIP: chromium/chromedriver not installed (BITNET_SKIP_BROWSER=1)")
    pytest.fail("the page test needs Debian's chromium and chromium-driver (scripts/test installs "
                "them as root), or BITNET_SKIP_BROWSER=1 to skip")


def wait_for(fn, timeout=30, what=""):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_page_chat_and_dashboard():
    browser, driver_path = chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    s = Server("--parallel", "4")
    opts = Options()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,860", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        d.get(s.url + "/")
        assert d.title == "bitnet serve"
        wait_for(lambda: d.find_element(By.ID, "health").text == "ok", what="health ok")
        wait_for(lambda: "bitnet-tiny" in d.find_element(By.ID, "model").text, what="the model's name")
        d.execute_script("document.getElementById('seed').value = '7'")
        box = d.find_element(By.ID, "prompt")
        box.send_keys("Tell me a story about a brave little fox.")
        d.find_element(By.ID, "send").click()
        answer = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"), what="an answer")[0]
        wait_for(lambda: answer.get_attribute("data-done") == "1", what="the answer's end")
        assert "error" not in answer.get_attribute("class"), answer.text
        text = answer.text
        assert len(text) > 20 and "tokens" in text  # the answer and its line of figures
        assert int(answer.get_attribute("data-chunks")) > 3, "the answer did not stream"
        # The answer is what the API gives for the same conversation and seed.
        status, api, _ = s.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Tell me a story about a brave little fox."}],
            "max_tokens": 200, "temperature": 0.7, "seed": 7})
        assert status == 200 and text.startswith(api["choices"][0]["message"]["content"])
        # The dashboard followed: tokens counted, a tokens/s curve drawn with non-zero points.
        generated = s.metrics()["bitnet_generation_tokens_total"]
        wait_for(lambda: float(d.find_element(By.ID, "stat-generated").text) >= generated - 0.5,
                 what="the generated-token count")
        wait_for(lambda: d.execute_script("return Math.max(...series.tps) > 0"), what="a tokens/s point")
        wait_for(lambda: int(d.find_element(By.ID, "chart-tps").get_attribute("data-points") or 0) >= 3,
                 what="the tokens/s chart")
        blue = d.execute_script("""
            const c = document.getElementById('chart-tps'), g = c.getContext('2d');
            const px = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < px.length; i += 4)
              if (px[i] < 90 && px[i + 1] > 80 && px[i + 1] < 150 && px[i + 2] > 180 && px[i + 3] > 0) n++;
            return n;""")
        assert blue > 20, "no curve drawn on the tokens/s chart"
        out = os.environ.get("BITNET_SCREENSHOT_DIR") or tempfile.gettempdir()
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "serve-page.png")
        assert d.save_screenshot(path)
        with open(path, "rb") as f:
            png = f.read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        print(f"screenshot: {path}")
        # Stop: the browser aborts the stream, the server cancels the request.
        before = s.wait_idle()["bitnet_requests_cancelled_total"]
        d.find_element(By.ID, "reset").click()
        d.execute_script("document.getElementById('max_tokens').value = '450'")
        box.send_keys("Tell me a very long story.")
        d.find_element(By.ID, "send").click()
        second = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"), what="a second answer")[0]
        wait_for(lambda: int(second.get_attribute("data-chunks") or 0) > 2, what="streaming")
        d.find_element(By.ID, "stop").click()
        wait_for(lambda: second.get_attribute("data-done") == "1", what="the stop")
        assert "stopped" in second.text
        after = s.wait_idle(timeout=10)
        assert after["bitnet_requests_cancelled_total"] == before + 1
    finally:
        d.quit()
        assert s.stop() == 0
