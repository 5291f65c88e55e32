"""A user in Debian's Chromium, driving the booted host's webmail (Roundcube) through Playwright.

Run in the guest's network namespace (BootedHost.in_guest_net), so that the browser reaches nginx on the
host's 127.0.0.1:8080 as cloudflared does. Reads one JSON scenario on stdin, prints one JSON result, and
saves a screenshot of every step it names into `shots`:

  {"scenario": "first_login", "user", "password", "new_password", "shots"}
  {"scenario": "read_and_send", "user", "password", "subject", "to", "send_subject", "shots"}
  {"scenario": "vacation", "user", "password", "vacation_subject", "vacation_body", "shots"}
  {"scenario": "login", "user", "password", "shots"}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Frame, Page, sync_playwright

BASE = "http://127.0.0.1:8080/"
CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 30_000


def shot(page: Page, shots: str, name: str) -> str:
    path = str(Path(shots) / f"{name}.png")
    page.screenshot(path=path, full_page=True)
    return path


def login(page: Page, user: str, password: str) -> None:
    page.goto(BASE)
    page.fill("#rcmloginuser", user)
    page.fill("#rcmloginpwd", password)
    page.click("#rcmloginsubmit")
    page.wait_for_load_state("networkidle")


def frame_with(page: Page, selector: str) -> Frame:
    """The frame (the page's own, or the settings' content frame) holding `selector`."""
    for _ in range(60):
        try:
            page.wait_for_load_state("load")
            for frame in page.frames:
                if frame.query_selector(selector) is not None:
                    return frame
        except PlaywrightError:
            pass  # a frame navigated while it was asked: ask again
        page.wait_for_timeout(500)
    raise RuntimeError(f"no frame holds {selector} at {page.url}")


def messages_shown(page: Page) -> list[str]:
    return [m.inner_text() for m in page.query_selector_all("#messagestack div")]


def wait_for_message(page: Page, text: str) -> str:
    page.wait_for_selector(f"#messagestack div:has-text({json.dumps(text)})", timeout=TIMEOUT_MS)
    return text


def first_login(page: Page, a: dict[str, Any]) -> dict[str, Any]:
    login(page, a["user"], a["password"])
    landed = page.url
    shots = [shot(page, a["shots"], "01-first-login-asks-for-a-new-password")]
    form = frame_with(page, "#newpasswd")
    form.fill("#curpasswd", a["password"])
    form.fill("#newpasswd", a["new_password"])
    form.fill("#confpasswd", a["new_password"])
    form.click("button.mainaction")
    saved = wait_for_message(page, "Successfully saved")
    shots.append(shot(page, a["shots"], "02-password-changed"))
    return {"landed": landed, "saved": saved, "shots": shots}


def read_and_send(page: Page, a: dict[str, Any]) -> dict[str, Any]:
    login(page, a["user"], a["password"])
    page.wait_for_selector(f"#messagelist tr:has-text({json.dumps(a['subject'])})", timeout=TIMEOUT_MS)
    shots = [shot(page, a["shots"], "03-inbox")]
    page.dblclick(f"#messagelist tr:has-text({json.dumps(a['subject'])})")
    page.wait_for_load_state("networkidle")
    body = frame_with(page, "#messagebody").inner_text("#messagebody")
    shots.append(shot(page, a["shots"], "04-message-read"))
    page.goto(BASE + "?_task=mail&_action=compose")
    page.wait_for_selector("#compose-subject", timeout=TIMEOUT_MS)
    page.fill("ul.recipient-input input", a["to"])
    page.keyboard.press("Enter")
    page.fill("#compose-subject", a["send_subject"])
    page.fill("#composebody", "Sent from webmail by the orgmail tests.\n")
    shots.append(shot(page, a["shots"], "05-compose"))
    page.click("button.send")
    sent = wait_for_message(page, "Message sent successfully")
    return {"body": body, "sent": sent, "shots": shots}


def vacation(page: Page, a: dict[str, Any]) -> dict[str, Any]:
    login(page, a["user"], a["password"])
    page.goto(BASE + "?_task=settings&_action=plugin.managesieve-vacation")
    form = frame_with(page, "#vacation_reason")
    form.fill("#vacation_subject", a["vacation_subject"])
    form.fill("#vacation_reason", a["vacation_body"])
    form.select_option("#vacation_status", "on")
    shots = [shot(page, a["shots"], "06-out-of-office")]
    form.click("button.submit")
    saved = wait_for_message(page, "Out-of-office data saved successfully")
    shots.append(shot(page, a["shots"], "07-out-of-office-saved"))
    return {"saved": saved, "shots": shots}


def plain_login(page: Page, a: dict[str, Any]) -> dict[str, Any]:
    login(page, a["user"], a["password"])
    return {"url": page.url, "logged_in": page.query_selector("#rcmloginuser") is None,
            "messages": messages_shown(page), "shots": [shot(page, a["shots"], a.get("shot", "login"))]}


SCENARIOS = {"first_login": first_login, "read_and_send": read_and_send, "vacation": vacation, "login": plain_login}


def main() -> int:
    args = json.loads(sys.stdin.read())
    Path(args["shots"]).mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # As root (the tests' user) Chromium runs only without its sandbox.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            result = SCENARIOS[args["scenario"]](page, args)
        except Exception as e:
            shot(page, args["shots"], f"failed-{args['scenario']}")
            result = {"error": f"{type(e).__name__}: {e}", "url": page.url, "messages": messages_shown(page)}
        browser.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
