"""The web console in a real headless Chromium (Debian's ``chromium``, driven by Playwright; .ci/run installs
both): log in, see the HIS go down and come back on the self-refreshing status page within the probe interval,
find a message by control id, retry a dead letter and find that retry in the audit trail; an anonymous visit
ends on the login page and a cross-site form POST changes nothing.

With GATEWAYD_SCREENSHOTS=DIR the pages are saved there as PNG (docs/img/ holds those docs/operations.md shows).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gateway.ops.console import hash_password
from tests.e2e.harness import Lock, eventually, free_port
from tests.e2e.test_console_e2e import dead_letters

# In CI (.ci/run installs both) a missing browser fails the test; on a developer's machine without them it is skipped.
if os.environ.get("CI"):
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (.[test])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (.ci/run installs it)")

PASSWORD = "correct horse battery staple"
PROBE = 2.0


def shot(page, name: str) -> None:
    where = os.environ.get("GATEWAYD_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"console-{name}.png"), full_page=True)


def test_the_console_in_a_real_browser(tmp_path):
    admin = free_port()
    lock = Lock(tmp_path, doctors=1, days=1,
                his={"ack_timeout": "1s", "retry_initial": "100ms", "retry_max": "300ms", "max_attempts": 3,
                     "probe_interval": f"{PROBE:g}s"},
                gateway={"admin": {"listen": f"tcp:{admin}:interface=127.0.0.1",
                                   "operators": [{"name": "alice", "password_hash": hash_password(PASSWORD)}]}})
    lock.gateway_config["outer"]["answer_within"] = "1s"
    lock.write_configs()
    console = f"http://127.0.0.1:{admin}/console"
    with lock, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            # anonymous: the console sends the browser to its login page
            page.goto(f"{console}/dead")
            assert page.url == f"{console}/login"
            shot(page, "login")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", PASSWORD)
            page.click("button:has-text('log in')")
            page.wait_for_url(f"{console}/")
            assert "every HIS endpoint up" in page.inner_text("#his-state")
            assert page.locator("#chart-in rect").count() >= 1  # the simulator's slot notices, just now

            # the HIS stopped while nothing is sent: the page (refreshing itself every 5 s) says so; then back
            lock.sim.stop()
            page.wait_for_selector("text=HIS down: his", timeout=(PROBE + 5 + 5) * 1000)
            assert "(live)" in page.inner_text("#status")  # the running probe's finding, not a recorded one
            shot(page, "status-his-down")
            lock.start_sim()
            page.wait_for_selector("text=every HIS endpoint up", timeout=(PROBE + 5 + 5) * 1000)
            shot(page, "status")

            # a silent HIS: the booking's SRM and its cancel dead-letter
            cancel_id, control_id = dead_letters(lock)

            # found by its control id, through the search form
            page.click("nav a:has-text('messages')")
            page.fill("input[name=control_id]", control_id)
            page.click("button:has-text('search')")
            assert page.locator("#messages tr").count() == 2  # the header and the one message
            shot(page, "messages")
            page.click(f"#messages a[href='/console/messages/{cancel_id}']")
            assert "***" in page.inner_text("#raw") and "王" not in page.inner_text("#raw")
            shot(page, "message")

            # a cross-site form (another origin, the operator's browser logged in) changes nothing
            page.set_content(f"<form method=post action={console}/dead/{cancel_id}/retry>"
                             f"<input name=confirm value=yes><button id=go>go</button></form>")
            page.click("#go")
            page.wait_for_load_state()
            assert lock.chamber_rows("SELECT state FROM messages WHERE id = ?", cancel_id) == [("dead",)]

            # retried from the dead letters, confirmed
            page.goto(f"{console}/dead")
            shot(page, "dead")
            row = page.locator("#dead tr", has_text=control_id)
            row.locator("input[name=confirm]").check()
            row.locator("button:has-text('retry')").click()
            assert "resubmitted" in page.inner_text("#outcome")
            eventually(lambda: lock.chamber_rows("SELECT state FROM messages WHERE id = ?", cancel_id)
                       == [("delivered",)], timeout=15, what="the resubmitted cancel to reach the HIS")

            # and that retry is in the audit trail
            page.goto(f"{console}/audit")
            page.fill("input[name=action]", "console.retry")
            page.click("button:has-text('search')")
            audit = page.inner_text("#audit")
            assert "console.retry" in audit and "console:alice" in audit and f"Message {cancel_id}" in audit
            shot(page, "audit")
        finally:
            browser.close()
