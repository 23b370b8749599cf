#!/usr/bin/env python3
"""Loads the chat_server demo page in headless Chromium, clicks the sample-call
buttons like a person would (real mouse events through the DevTools protocol),
checks the call cards in the DOM, and saves a screenshot and the DOM. The page is
built on the session's client (clients/js, served at /client/tool-dispatch.js);
the check makes sure it is loaded from there.

The page is served through a TCP proxy that this script controls, so that the
network can be cut under the page mid-call: the page must reconnect by itself,
resume its run, and end with exactly one card per call.

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


class Proxy:
    """A TCP proxy on a free loopback port; `cut()` resets every open connection."""

    def __init__(self, host, port):
        self.target, self.pairs, self.server, self.port = (host, port), set(), None, None

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the event loop is closing
        finally:
            self.pairs.discard(pair)

    def cut(self):
        n = len(self.pairs)
        for writer, up_writer in list(self.pairs):
            writer.transport.abort()
            up_writer.transport.abort()
        return n

    def close(self):
        self.cut()
        self.server.close()


CARDS = ("[...document.querySelectorAll('#cards .card')].map(c => ({call: c.dataset.callId,"
         " status: c.dataset.status, tool: c.querySelector('.tool').textContent,"
         " progress: c.querySelector('progress').value}))")


async def check(base, out):
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    proxy = Proxy(host, int(port))
    await proxy.start()
    page_url = f"http://127.0.0.1:{proxy.port}"
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
            await cdp.call("Page.navigate", url=f"{page_url}/?token=alice-token")
            await cdp.until("document.readyState === 'complete' && "
                            "document.getElementById('status')?.dataset.state === 'open'", "the socket to open")
            await cdp.until("document.querySelector('#notices li[data-type=ready]')", "the ready message")
            # The page is built on the session's client, served from clients/js.
            loaded = await cdp.js("performance.getEntriesByType('resource').map(r => new URL(r.name).pathname)")
            assert "/client/tool-dispatch.js" in loaded, loaded
            assert await cdp.js("typeof window.chatClient.sendTurn") == "function"
            assert not await cdp.js("[...document.scripts].some(s => s.textContent.includes('new WebSocket'))"), \
                "the page opens a WebSocket of its own"

            await cdp.click("#send-openai")
            await cdp.until("document.querySelector('#notices li[data-type=tool_results]')", "OpenAI results")
            await cdp.click("#send-anthropic")
            await cdp.until("document.querySelectorAll('#notices li[data-type=tool_results]').length === 2",
                            "Anthropic results")
            await cdp.click("#send-bad")
            await cdp.until("document.querySelector('#notices li[data-type=error]')", "the error message")

            # The network drops mid-call: the page reconnects by itself and resumes.
            await cdp.click("#send-slow")
            await cdp.until("[...document.querySelectorAll('.card')].some(c => c.dataset.status === 'running'"
                            " && c.querySelector('progress').value > 0)", "the slow call's first progress")
            await cdp.js("window.__states = []; new MutationObserver(() => window.__states.push("
                         "document.getElementById('status').dataset.state)).observe("
                         "document.getElementById('status'), {attributes: true})")
            cut = proxy.cut()
            assert cut >= 1, "no connection to cut"
            await cdp.until("window.__states.includes('reconnecting') && "
                            "document.getElementById('status').dataset.state === 'resumed'", "the resume")
            await cdp.until("document.querySelectorAll('.card').length === 4 && [...document.querySelectorAll"
                            "('.card')].every(c => c.dataset.status === 'success')", "every call to succeed")
            cards = await cdp.js(CARDS)
            calls = [c["call"] for c in cards]
            assert len(calls) == len(set(calls)) == 4, f"one card per call: {cards}"
            assert all(c["status"] == "success" and c["progress"] == 1 for c in cards), cards
            assert sorted(c["tool"] for c in cards) == ["get_weather", "get_weather", "slow_task", "slow_task"], cards
            states = await cdp.js("window.__states")

            # A call that needs approval: the card offers Approve, with the time left.
            await cdp.click("#send-email")
            await cdp.until("document.querySelector('.card[data-status=awaiting_approval] .approval:not([hidden])')",
                            "the approval request")
            left = await cdp.js("document.querySelector('.card[data-status=awaiting_approval] .left').textContent")
            assert left.endswith("s left"), left
            await cdp.click(".card[data-status=awaiting_approval] button.approve")
            await cdp.until("document.querySelectorAll('.card').length === 5 && [...document.querySelectorAll"
                            "('.card')].every(c => c.dataset.status === 'success')", "the approved call to succeed")
            await cdp.until("document.querySelector('#notices li[data-type=decision_recorded]')", "the decision notice")

            # Stop cancels the run's calls in flight.
            await cdp.click("#send-slow")
            await cdp.until("document.querySelector('.card[data-status=running]')", "a running call")
            await cdp.click("#stop")
            await cdp.until("document.querySelector('.card[data-status=cancelled]')", "the stopped call")
            await cdp.until("document.querySelector('#notices li[data-type=run_cancelled]')", "the stop notice")

            page_text = await cdp.js("document.body.innerText")
            assert "sk-demo-secret" not in page_text, "the api key was shown"
            assert "[REDACTED]" in page_text, page_text
            stored = json.loads(await cdp.js("sessionStorage.getItem('tool-dispatch-run')"))
            assert stored["last_seq"] > 0 and stored["run_id"], stored

            os.makedirs(out, exist_ok=True)
            shot = await cdp.call("Page.captureScreenshot", format="png")
            with open(os.path.join(out, "chat_page.png"), "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            with open(os.path.join(out, "chat_page.html"), "w") as f:
                f.write(await cdp.js("document.documentElement.outerHTML"))
            print(f"browser check: 6 cards (one approved, one stopped), {cut} connection(s) cut, states {states}, "
                  f"run {stored['run_id']} at seq {stored['last_seq']}; "
                  f"screenshot {os.path.join(out, 'chat_page.png')}")
    finally:
        proxy.close()
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
