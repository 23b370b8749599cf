#!/usr/bin/env python3
"""Loads the chat_server demo page in headless Chromium, clicks the sample-call
buttons like a person would (real mouse events through the DevTools protocol),
checks the live event list in the DOM, and saves a screenshot and the DOM.

Usage: browser_check.py http://127.0.0.1:PORT OUT_DIR
Needs: chromium (Debian package) on PATH, the `websockets` package.
Exits 0 when every check passes, 1 otherwise.
"""
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

try:
    from websockets.asyncio.client import connect
except ImportError:  # pragma: no cover
    from websockets import connect

DEADLINE = 60  # seconds; a bound on a stuck browser, not a performance threshold
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1100,900"]


def wait_for_port(profile, proc):
    path = os.path.join(profile, "DevToolsActivePort")
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        if os.path.exists(path):
            lines = open(path).read().split()
            if lines:
                return int(lines[0])
        time.sleep(0.1)
    raise RuntimeError("chromium did not open its DevTools port")


class Cdp:
    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), DEADLINE))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expr):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expr, what):
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if await self.js(f"!!({expr})"):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    async def click(self, selector):
        box = await self.js(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


async def check(base, out):
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen(["chromium", *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = wait_for_port(profile, proc)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        async with connect(page["webSocketDebuggerUrl"], max_size=2**26) as ws:
            cdp = Cdp(ws)
            await cdp.call("Page.enable")
            await cdp.call("Page.navigate", url=f"{base}/?token=alice-token")
            await cdp.until("document.readyState === 'complete' && "
                            "document.getElementById('status')?.dataset.state === 'open'", "the socket to open")
            await cdp.until("document.querySelector('#events li[data-type=ready]')", "the ready message")

            await cdp.click("#send-openai")
            await cdp.until("document.querySelector('#events li[data-type=tool_results]')", "OpenAI results")
            await cdp.click("#send-anthropic")
            await cdp.until("document.querySelectorAll('#events li[data-type=tool_results]').length === 2",
                            "Anthropic results")
            await cdp.click("#send-bad")
            await cdp.until("document.querySelector('#events li[data-type=error]')", "the error message")

            items = await cdp.js("[...document.querySelectorAll('#events li')].map(li => ({"
                                 "type: li.dataset.type, call: li.dataset.callId || null,"
                                 "status: li.dataset.status || null, text: li.textContent}))")
            kinds = [i["type"] for i in items]
            executing = [i["call"] for i in items if i["type"] == "tool_executing"]
            done = {i["call"]: i["status"] for i in items if i["type"] == "tool_completed"}
            assert len(executing) == 3, items
            assert set(done) == set(executing), items
            assert all(s == "success" for s in done.values()), done
            for call in executing:
                pos = [n for n, i in enumerate(items) if i["call"] == call]
                assert items[pos[0]]["type"] == "tool_executing" and items[pos[-1]]["type"] == "tool_completed", items
            assert "tool_progress" in kinds, kinds
            assert kinds.count("tool_results") == 2 and kinds[-1] == "error", kinds
            page_text = await cdp.js("document.body.innerText")
            assert "sk-demo-secret" not in page_text, "the api key was shown"
            assert "[REDACTED]" in page_text, page_text

            os.makedirs(out, exist_ok=True)
            shot = await cdp.call("Page.captureScreenshot", format="png")
            with open(os.path.join(out, "chat_page.png"), "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            with open(os.path.join(out, "chat_page.html"), "w") as f:
                f.write(await cdp.js("document.documentElement.outerHTML"))
            print(f"browser check: {len(items)} events listed ({', '.join(sorted(set(kinds)))}); "
                  f"screenshot {os.path.join(out, 'chat_page.png')}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(check(sys.argv[1].rstrip("/"), sys.argv[2]))
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        print(f"browser check: FAILED: {e!r}", file=sys.stderr)
        sys.exit(1)
