"""The operator console in a real browser (Chromium driven by Playwright) against a live stack.

Real redis-server, a real worker scoring two cameras with the tiny fitted model, a real console.
``camA`` gets good frames all along; ``camB`` gets a few good frames, then defects. Screenshots are
kept under the test's ``tmp_path/screenshots``. Playwright uses Debian's ``chromium`` (Playwright's
own browser download is not available): the test skips without it locally and fails under CI.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_helpers import PASSWORDS, add_users, shadow_msgs, start_console
from registry_helpers import tiny_artifact
from support import wait_until
from tools import require_tool
from worker_helpers import push_frame, push_frames

from dfm_stream import keys
from dfm_stream.alarms import publish_event
from dfm_stream.promotion import Promotions
from dfm_stream.registry import ModelRef, ModelRegistry
from dfm_stream.shadow import ShadowPublisher
from dfm_stream.wire import EventMsg

playwright_api = pytest.importorskip("playwright.sync_api")
WAIT_MS = 60_000


@pytest.fixture
def chromium() -> Iterator[object]:
    """A headless Debian chromium under Playwright."""
    exe = require_tool("chromium")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def good_frames_on_cam_a(redis_client, artifact) -> Iterator[None]:
    """Push a good frame to camA five times a second for the whole test (moving pictures)."""
    stop = threading.Event()

    def loop() -> None:
        seq = 0
        while not stop.wait(0.2):
            push_frame(redis_client, "camA", artifact.good[seq % len(artifact.good)], seq, maxlen=200)
            seq += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)


def log_in(browser: object, url: str, name: str, shots: Path) -> object:
    page = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{url}/")
    assert "/login" in page.url  # a users file: nobody sees anything before logging in
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(PASSWORDS[name])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{url}/")
    page.screenshot(path=str(shots / f"overview-{name}.png"))
    return page


def tile(page: object, camera: str) -> object:
    return page.locator(f'article.tile[data-camera="{camera}"]')


def frame_loaded(page: object, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
    )


def test_an_operator_reviews_alarms_that_every_console_sees_live(
    redis_url, redis_client, procs, artifact, chromium, good_frames_on_cam_a, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    users = tmp_path / "users.json"
    add_users(users)
    push_frames(redis_client, "camB", artifact.good[:3])
    worker = procs.dfm(
        *("work", "--redis", redis_url, "--model", str(artifact.path), "--cameras", "camA,camB"),
        *("--device", "cpu", "--metrics-port", "-1", "--max-wait-ms", "5", "--alarm-clear-after", "1"),
        name="worker",
    )
    _, url = start_console(procs, redis_url, users)

    # the overview: every camera, with a frame that keeps being replaced
    olga = log_in(chromium, url, "olga", shots)
    for cam in ("camA", "camB"):
        tile(olga, cam).wait_for()
        frame_loaded(olga, f'article.tile[data-camera="{cam}"] img')
    first_src = tile(olga, "camA").locator("img").get_attribute("src")
    olga.wait_for_function(
        "s => document.querySelector('article.tile[data-camera=\"camA\"] img').getAttribute('src') !== s",
        arg=first_src,
    )
    tile(olga, "camA").locator("[data-field=alarm_text]").filter(has_text="OK").wait_for()
    olga.screenshot(path=str(shots / "overview.png"))

    # cameras appear and disappear as they do in Redis, without a reload
    push_frame(redis_client, "camC", artifact.good[0], 0)
    tile(olga, "camC").wait_for()
    redis_client.delete(keys.frames_key("camC"))
    tile(olga, "camC").wait_for(state="detached")

    # a second browser (a viewer) watches the review queue: no buttons, and no reload from here on
    vic = log_in(chromium, url, "vic", shots)
    vic.goto(f"{url}/alarms")
    vic.evaluate("window.__notReloaded = true")
    assert vic.get_by_role("button", name="Acknowledge").count() == 0

    # a defect turns camB's tile into an alarm, and the alarm reaches the viewer's queue with its picture
    push_frame(redis_client, "camB", artifact.defect[0], 3)
    alarm_tile = tile(olga, "camB")
    alarm_tile.locator("[data-field=alarm_text]").filter(has_text="ALARM").wait_for()
    assert "alarm" in alarm_tile.get_attribute("class")
    olga.screenshot(path=str(shots / "overview-alarm.png"))
    vic.locator("article.alarm-item").first.wait_for()
    frame_loaded(vic, "article.alarm-item img")

    # a second alarm (a good frame clears the first), then the operator reviews both
    push_frame(redis_client, "camB", artifact.good[3], 4)
    wait_until(lambda: redis_client.hget(keys.alarm_state_key("camB"), "active") == b"0", 60, what="clear")
    push_frame(redis_client, "camB", artifact.defect[1], 5)
    wait_until(lambda: vic.locator("article.alarm-item").count() == 2, 60, interval=0.3, what="2 alarms")
    vic.screenshot(path=str(shots / "queue-viewer.png"))
    olga.goto(f"{url}/alarms")
    older = olga.locator("article.alarm-item").nth(1)  # newest first
    older.get_by_label("Comment (optional)").fill("real scratch")
    older.get_by_role("button", name="Acknowledge").click()
    olga.wait_for_url(f"{url}/alarms")
    olga.locator("article.alarm-item").nth(0).get_by_role("button", name="False alarm").click()
    olga.wait_for_url(f"{url}/alarms")
    olga.screenshot(path=str(shots / "queue-operator.png"))

    # the viewer's page shows both decisions without reloading
    vic.locator("[data-field=review]").filter(has_text="Acknowledged by olga: “real scratch”").wait_for()
    vic.locator("[data-field=review]").filter(has_text="False alarm by olga").wait_for()
    assert vic.evaluate("window.__notReloaded") is True
    vic.screenshot(path=str(shots / "queue-viewer-reviewed.png"))

    # the viewer's endpoints answer 403; a forged request without the CSRF token is refused
    alarm_id = vic.locator("article.alarm-item").first.get_attribute("data-alarm-id")
    token = vic.locator('meta[name="csrf-token"]').get_attribute("content")
    answer = vic.request.post(
        f"{url}/alarms/{alarm_id}/review", form={"csrf_token": token, "decision": "acknowledged"}
    )
    assert answer.status == 403
    forged = olga.request.post(f"{url}/alarms/{alarm_id}/review", form={"decision": "acknowledged"})
    assert forged.status == 403

    reviews = {k.decode(): json.loads(v) for k, v in redis_client.hgetall(keys.reviews_key()).items()}
    assert sorted(r["decision"] for r in reviews.values()) == ["acknowledged", "false_alarm"]
    assert redis_client.xlen(keys.candidates_key("camB")) == 1

    # the camera page: the heat map of the last alarm and the score chart with its threshold
    olga.goto(f"{url}/camera/camB")
    olga.locator("#overlay").wait_for()
    frame_loaded(olga, "#overlay-img")
    olga.locator("#chart .chart-threshold").wait_for(state="attached")  # a line: no area, never "visible"
    olga.locator("#chart .chart-anomalous").first.wait_for()
    olga.screenshot(path=str(shots / "camera.png"))
    for name in ("overview.png", "overview-alarm.png", "queue-viewer-reviewed.png", "camera.png"):
        print(f"screenshot: {shots / name}")
    assert procs.stop(worker) == 0


PAGES = ("/", "/camera/camB", "/alarms", "/models", "/health")
SCREENS = {"laptop": (1366, 768), "tablet": (768, 1024)}


def test_every_page_passes_axe_and_fits_a_laptop_and_a_tablet_screen(
    redis_url, redis_client, procs, artifact, chromium, tmp_path: Path
) -> None:
    axe = pytest.importorskip("axe_playwright_python.sync_playwright").Axe()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    users = tmp_path / "users.json"
    add_users(users)
    push_frames(redis_client, "camA", artifact.good[:2])
    entry = push_frame(redis_client, "camB", artifact.defect[0], 0)
    publish_event(
        redis_client,
        EventMsg("raised", "camB", 1, f"camB:{entry}", 0, 9.0, 4.0, "tiny@1", image=_jpeg(artifact)),
    )
    registry = ModelRegistry(redis_client)
    registry.push("parts", tiny_artifact())
    registry.push("parts", tiny_artifact(seed=1))
    registry.assign("camB", ModelRef("parts", 1))
    Promotions(registry).shadow("camB", ModelRef("parts", 2))  # the camera page shows its comparison
    ShadowPublisher(redis_client, keys.DEFAULT_PREFIX).write(shadow_msgs("camB", "parts@1", "parts@2"))
    _, url = start_console(procs, redis_url, users)
    page = chromium.new_context(bypass_csp=True).new_page()  # lets axe inject its script; not our pages
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{url}/login")
    page.get_by_label("User name").fill("olga")
    page.get_by_label("Password").fill(PASSWORDS["olga"])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{url}/")
    problems = []
    for screen, (width, height) in SCREENS.items():
        page.set_viewport_size({"width": width, "height": height})
        for path in PAGES:
            page.goto(url + path)
            page.wait_for_function("() => Number(document.body.dataset.snapshots) >= 1")  # live data shown
            page.screenshot(path=str(shots / f"{screen}{path.replace('/', '-')}.png"), full_page=True)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            if overflow > 0:
                problems.append(f"{screen} {path}: {overflow} px wider than the screen")
            if screen == "laptop":
                for v in axe.run(page).response["violations"]:
                    problems.append(f"{path}: {v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']]}")

    # the operator promotes camB's candidate from its camera page, through the confirmation page
    page.set_viewport_size({"width": 1366, "height": 768})
    page.goto(f"{url}/camera/camB")
    page.get_by_role("heading", name="Shadow candidate").wait_for()
    page.get_by_role("button", name="Promote candidate").click()
    page.get_by_text("camera camB: parts@1 -> parts@2").wait_for()
    problems += [f"confirm: {v['id']} ({v['impact']})" for v in axe.run(page).response["violations"]]
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_url(f"{url}/camera/camB")
    page.get_by_text("Camera camB now runs parts@2 (was parts@1).").wait_for()
    page.screenshot(path=str(shots / "camera-promoted.png"), full_page=True)
    assert registry.assignments()["camB"] == ModelRef("parts", 2)
    assert problems == []


def _jpeg(artifact: object) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", artifact.defect[0])
    assert ok
    return buf.tobytes()
