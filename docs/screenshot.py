"""Make docs/dashboard.png: the dashboard of a small, staged app, in headless chromium.

    .venv/bin/python docs/screenshot.py    # after `make test` (it installs chromium and playwright)

Stages, in a scratch directory, the database of an app with a few job types:
welcome mails and image resizes that succeed, an inventory sync that fails
three times, a nightly report on cron, a resize still running and some jobs
waiting.  Then it serves the dashboard in this process and photographs it with
the first failure's traceback open.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import worker
import worker_dashboard
from worker import JobContext, Queue, Worker

OUT = Path(__file__).resolve().parent / "dashboard.png"
CHROMIUM = "/usr/bin/chromium"


class UpstreamTimeout(Exception):
    """The inventory API did not answer in time."""


@worker.job
def send_welcome_email(ctx: JobContext, email: str) -> dict[str, str]:
    return {"sent_to": email}


@worker.job(queue="images")
def resize_image(ctx: JobContext, path: str, width: int) -> dict[str, object]:
    return {"path": path, "width": width}


def fetch_stock(sku: str) -> int:
    raise UpstreamTimeout(f"inventory API did not answer within 5.0 s (sku {sku})")


@worker.job(max_attempts=3, retry_delay=0)
def sync_inventory(ctx: JobContext, sku: str) -> int:
    return fetch_stock(sku)


@worker.job(cron="0 2 * * *")
def nightly_report(ctx: JobContext) -> None:
    pass


def stage(db: str) -> None:
    with Queue(db) as app:
        for n in range(4):
            app.enqueue("send_welcome_email", {"email": f"user{n}@example.com"})
        for n in range(3):
            app.enqueue("resize_image", {"path": f"uploads/{n}.jpg", "width": 800})
        app.enqueue("sync_inventory", {"sku": "SKU-1042"})
        busy, everyone = Worker(db, queues=["images"], concurrency=4), Worker(db)
        for _ in range(10):  # every due job runs, the failing one through its three attempts
            if busy.work() + everyone.work() == 0:
                break
        app.enqueue("resize_image", {"path": "uploads/3.jpg", "width": 800})
        busy.claim(1)  # shown as running on that worker
        app.enqueue("resize_image", {"path": "uploads/4.jpg", "width": 800})
        app.enqueue("send_welcome_email", {"email": "late@example.com"}, delay=600)
        app.enqueue("send_welcome_email", {"email": "new@example.com"})


def main() -> None:
    from playwright.sync_api import sync_playwright

    logging.getLogger("worker").setLevel(logging.ERROR)  # the staged failures are expected
    with tempfile.TemporaryDirectory() as scratch:
        db = str(Path(scratch) / "app.db")
        stage(db)
        server = worker_dashboard.DashboardServer(db, "127.0.0.1", 0, allow_actions=True, refresh_seconds=3600)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(f"{server.url}?token={server.token}")
                page.locator("#failures details summary").first.click()
                page.screenshot(path=str(OUT), full_page=True)
                browser.close()
        finally:
            server.shutdown()
            server.server_close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
