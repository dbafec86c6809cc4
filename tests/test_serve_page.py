"""The page of `python -m fer_jax.serve` in a real browser: Debian's headless Chromium driven by
Selenium, against the command itself (the shipped model; TensorFlow blocked) started on a free
loopback port.

A photo (the bundled example) is uploaded and its label and bars read off the page; the webcam
runs on Chromium's fake camera, fed a video made from that photo's real face, and labels must be
drawn over it; a refused camera, a file that is not an image and a photo without a face show
their states. Screenshots go to `$FER_JAX_SERVE_SCREENSHOTS` when set (the committed ones:
experiments/results/serve/), else to a temporary folder. Skipped, saying why, only when Chromium,
its driver or Selenium is missing (`.ci/run` installs them: apt-get install chromium
chromium-driver).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from PIL import Image

from data_pipelines.labels import CLASS_NAMES

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MISSING = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
if MISSING:
    pytest.skip(
        f"needs Debian's chromium and chromium-driver ({', '.join(MISSING)} not found): "
        "apt-get install chromium chromium-driver (.ci/run does)",
        allow_module_level=True,
    )
pytest.importorskip("selenium", reason="needs selenium: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from fer_jax.inference.predict import EXAMPLE_IMAGE  # noqa: E402
from tests.test_serve import Client  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs `python -m fer_jax.serve ARGS` with TensorFlow and TFDS unimportable (as uninstalled).
WITHOUT_TENSORFLOW = (
    "import runpy, sys\n"
    "sys.modules.update(dict.fromkeys(('tensorflow', 'tensorflow_datasets')))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module('fer_jax.serve', run_name='__main__', alter_sys=True)\n"
)
READY = re.compile(r"fer_jax\.serve: ready .*?(http://127\.0\.0\.1:(\d+)/)")
BROWSER_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1280,1100",
    "--use-fake-device-for-media-stream",
    # Nothing but the test server: no update checks, sync, metrics or other Google services.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
]
BOX_COLOUR = (0x1F, 0x6F, 0xEB)  # the first face's colour in app.js


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Client]]:
    """`python -m fer_jax.serve --port=0` (any free port), started and ready: its URL."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WITHOUT_TENSORFLOW,
            "fer_jax.serve",
            "--port=0",
            "--batch_size=2",
            "--max_pending=8",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def read() -> None:
        for line in process.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline, url = time.monotonic() + 300, None
    while url is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        if match := READY.search(line):
            url, port = match[1], int(match[2])
    if url is None:
        process.kill()
        pytest.fail("the server did not start:\n" + "".join(log)[-5000:])
    try:
        yield url, Client(port)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0, "".join(log)[-5000:]
    assert "Traceback" not in "".join(log), "".join(log)[-5000:]


def face_video(path: str, photo: str, frames: int = 12, size: tuple[int, int] = (640, 480)):
    """A Y4M video for Chromium's fake camera (which loops it): the head and shoulders of
    `photo`'s face (the bundled astronaut, face at x 177-272, y 66-161), framed as a webcam
    would, drifting left and right on a gray background."""
    width, height = size
    side = 420
    crop = Image.open(photo).convert("RGB").crop((105, 0, 345, 240)).resize((side, side))
    head = np.asarray(crop)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        for k in range(frames):
            canvas = np.full((height, width, 3), 96, np.uint8)
            left = (width - side) // 2 + round(40 * np.sin(2 * np.pi * k / frames))
            canvas[height - side :, left : left + side] = head
            f.write(b"FRAME\n" + cv2.cvtColor(canvas, cv2.COLOR_RGB2YUV_I420).tobytes())


def chromium(flags: list[str]) -> webdriver.Chrome:
    """Headless Chromium with `BROWSER_FLAGS` and `flags`, driven by Debian's chromedriver."""
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*BROWSER_FLAGS, *flags]:
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no usage statistics
    browser = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    browser.set_page_load_timeout(60)
    return browser


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    """Headless Chromium whose camera is the face video, camera access granted (as if the
    person had clicked Allow)."""
    video = str(tmp_path_factory.mktemp("camera") / "face.y4m")
    face_video(video, EXAMPLE_IMAGE)
    browser = chromium(
        ["--use-fake-ui-for-media-stream", f"--use-file-for-fake-video-capture={video}"]
    )
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> str:
    folder = os.environ.get("FER_JAX_SERVE_SCREENSHOTS") or str(tmp_path_factory.mktemp("shots"))
    os.makedirs(folder, exist_ok=True)
    return folder


def _state(browser: webdriver.Chrome) -> tuple[str, str]:
    status = browser.find_element(By.ID, "status")
    return status.get_attribute("data-state"), status.text


def _wait_for_state(browser: webdriver.Chrome, *states: str, timeout: float = 60) -> str:
    try:
        WebDriverWait(browser, timeout).until(lambda b: _state(b)[0] in states)
    except TimeoutException:
        pytest.fail(f"the page never showed {states}; it shows {_state(browser)}")
    return _state(browser)[1]


def _open(browser: webdriver.Chrome, url: str) -> None:
    browser.get(url)
    _wait_for_state(browser, "ready")


# JavaScript: `painted(id, [r, g, b])`, the pixels of a canvas of that colour (+-8 per channel).
PAINTED = """
const painted = (id, [r, g, b]) => {
  const canvas = document.getElementById(id);
  if (!canvas.width || !canvas.height) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - r) <= 8 && Math.abs(data[i + 1] - g) <= 8 &&
        Math.abs(data[i + 2] - b) <= 8 && data[i + 3] > 200) n++;
  }
  return n;
};
"""


def _painted(browser: webdriver.Chrome, canvas_id: str, colour: tuple[int, int, int]) -> int:
    """Pixels of `colour` on a canvas (`PAINTED`)."""
    return browser.execute_script(
        PAINTED + "return painted(arguments[0], arguments[1]);", canvas_id, colour
    )


def test_an_uploaded_photo_shows_its_face_label_and_seven_bars(server, driver, screenshots):
    url, client = server
    _open(driver, url)
    driver.find_element(By.ID, "file").send_keys(EXAMPLE_IMAGE)
    message = _wait_for_state(driver, "ok", "error", "noface")
    assert _state(driver)[0] == "ok", message

    with open(EXAMPLE_IMAGE, "rb") as f:
        answer = client.post("/v1/predict", f.read(), {"Content-Type": "image/jpeg"}).json()
    expected = [face["label"] for face in answer["faces"]]
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#faces .label")]
    assert labels == expected and set(labels) <= set(CLASS_NAMES)
    assert f"astronaut.jpg: 1 face: {expected[0]}." in message
    rows = driver.find_elements(By.CSS_SELECTOR, "#faces .face .bar-row")
    assert [r.find_element(By.CLASS_NAME, "name").text for r in rows] == list(CLASS_NAMES)
    top = driver.find_element(By.CSS_SELECTOR, "#faces .bar-row.top .name").text
    assert top == expected[0]
    assert _painted(driver, "photo-canvas", BOX_COLOUR) > 100  # the box and its label
    driver.save_screenshot(os.path.join(screenshots, "page_photo.png"))


def test_a_file_that_is_not_an_image_and_a_photo_without_a_face(server, driver, tmp_path):
    url, _ = server
    _open(driver, url)
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    driver.find_element(By.ID, "file").send_keys(str(notes))
    message = _wait_for_state(driver, "error")
    assert "Server error (400): notes.jpg: not an image" in message
    blank = tmp_path / "wall.jpg"
    Image.fromarray(np.full((240, 320), 128, np.uint8)).save(blank)
    driver.find_element(By.ID, "file").send_keys(str(blank))
    message = _wait_for_state(driver, "noface")
    assert "No face found in wall.jpg" in message
    assert not driver.find_elements(By.CSS_SELECTOR, "#faces .face")


def _live(browser: webdriver.Chrome) -> dict:
    """What the webcam view shows, read at one instant (frames come and go meanwhile)."""
    return browser.execute_script(
        PAINTED
        + """
        const status = document.getElementById('status');
        const overlay = document.getElementById('overlay');
        return {
          frames: Number(overlay.dataset.frames || 0),
          labels: [...document.querySelectorAll('#live-faces .label')].map((e) => e.textContent),
          state: status.dataset.state,
          message: status.textContent,
          rate: document.getElementById('rate').textContent,
          playing: document.getElementById('video').videoWidth > 0 &&
            !document.getElementById('video').paused,
          painted: painted('overlay', arguments[0]),
        };
        """,
        BOX_COLOUR,
    )


def test_the_webcam_gets_labels_drawn_over_the_live_video(server, driver, screenshots):
    url, _ = server
    _open(driver, url)
    driver.find_element(By.ID, "tab-webcam").click()
    driver.find_element(By.ID, "camera").click()
    seen: list[dict] = []

    def labelled(browser) -> dict | bool:
        live = _live(browser)
        seen.append(live)
        ok = live["frames"] >= 3 and live["labels"] and live["state"] == "ok"
        return live if ok and live["painted"] > 100 else False

    try:
        live = WebDriverWait(driver, 90, poll_frequency=0.5).until(labelled)
    except TimeoutException:
        pytest.fail(f"no labels drawn over the video; the page showed {seen[-3:]}")
    driver.save_screenshot(os.path.join(screenshots, "page_webcam.png"))
    assert live["message"].startswith("Live: ") and set(live["labels"]) <= set(CLASS_NAMES)
    assert "frames/s analysed" in live["rate"] and live["playing"]
    driver.find_element(By.ID, "camera").click()
    assert _wait_for_state(driver, "ready") == "Camera stopped."


def test_a_refused_camera_says_so(server):
    url, _ = server
    browser = chromium(["--deny-permission-prompts"])  # as if the person had clicked Block
    try:
        _open(browser, url)
        browser.find_element(By.ID, "tab-webcam").click()
        browser.find_element(By.ID, "camera").click()
        message = _wait_for_state(browser, "refused")
        assert message.startswith("Camera refused: allow this page to use the camera")
    finally:
        browser.quit()


def test_the_page_loads_nothing_from_elsewhere(server, driver):
    url, _ = server
    _open(driver, url)
    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name);"
    )
    assert loaded and all(name.startswith(url) for name in loaded), loaded
