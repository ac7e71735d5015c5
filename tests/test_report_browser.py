"""report.html in a real browser: headless Chromium loads it, every image decodes, nothing is
fetched from elsewhere and no console error occurs.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on file descriptors 3 and 4), so the test needs nothing but the browser.
It is skipped only when no Chromium binary is found (Debian: ``apt-get install -y chromium``;
elsewhere set ``VAELAB_CHROMIUM`` to the binary).
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.config import load_preset, override
from vaelab.report import write_report
from vaelab.train import fit

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    env = os.environ.get("VAELAB_CHROMIUM")
    if env:
        return env
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: the protocol's fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI containers run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            pass_fds=(3, 4),
            preexec_fn=wire_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.timeout = timeout
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit {self.proc.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + self.timeout
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            os.close(fd)


def console_errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and failed loads among events."""
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value")) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            out.append(f"load failed: {p.get('errorText')}")
    return out


def open_in_chromium(binary: str, page: Path, profile: Path) -> tuple[list, list, list, bytes]:
    """Load ``page``; returns (images, requested URLs, errors, PNG screenshot)."""
    cdp = DevTools(binary, profile)
    try:
        targets = cdp.send("Target.getTargets")["targetInfos"]
        target = next(t for t in targets if t["type"] == "page")
        session = cdp.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.send(f"{domain}.enable", session=session)
        cdp.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        cdp.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        cdp.wait_for("Page.loadEventFired")
        script = (
            "JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, "
            "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"
        )
        value = cdp.send(
            "Runtime.evaluate", {"expression": script, "returnByValue": True}, session=session
        )["result"]["value"]
        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        time.sleep(0.2)  # let late console/log events arrive
        cdp.send("Runtime.evaluate", {"expression": "1"}, session=session)
        urls = [
            e["params"]["request"]["url"]
            for e in cdp.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        return json.loads(value), urls, console_errors(cdp.events), base64.b64decode(shot)
    finally:
        cdp.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    cfg = override(
        load_preset("quickstart"),
        ["train.epochs=2", "model.hidden=32", "model.latent_dim=3", "train.report=false"],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = fit(cfg, out_dir=tmp_path_factory.mktemp("runs"), progress=False).run_dir
        return write_report(run_dir)
    finally:
        torch.set_num_threads(threads)


def test_report_displays_in_headless_chromium(report, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no Chromium binary found: apt-get install -y chromium (or set VAELAB_CHROMIUM)"
        )
    images, urls, errors, shot = open_in_chromium(binary, report, tmp_path / "profile")

    assert errors == [], errors
    assert len(images) >= 10, images
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert broken == [], broken
    assert "traversal-animation" in {i["alt"] for i in images}
    # The only document fetched is the report itself; images are data URIs.
    fetched = [u for u in urls if not u.startswith("data:")]
    assert fetched == [report.resolve().as_uri()], fetched
    grey = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
    assert grey.shape == (900, 1200) and grey.std() > 10, "blank screenshot"
