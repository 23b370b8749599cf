#!/usr/bin/env python3
"""Drives tool-dispatch's conformance harness (examples/mcp_conformance.rs) with the
Python `mcp` SDK (2.x) over streamable HTTP, in both protocol revisions (the
initialize handshake with sessions, `legacy`, and the stateless 2026-07-28):

- rich results arrive as the SDK's own content types: an image (PNG bytes), a
  resource link, audio, an embedded resource;
- a call that needs approval is asked of the client by elicitation (an
  elicitation/create in the legacy revision, an input_required result in
  2026-07-28): accept runs it, decline refuses it.

Usage: mcp_content_client.py http://127.0.0.1:PORT/mcp
Exits 0 when every check passes, 1 otherwise.
"""
import base64
import sys

import anyio
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TIMEOUT = 60  # seconds; a bound on a stuck server, not a performance threshold
checks = 0


def ok(what):
    global checks
    checks += 1
    print(f"  ok: {what}")


def answering(action, asked):
    async def callback(context, params):
        asked.append(params.message)
        return types.ElicitResult(action=action)

    return callback


async def run(url):
    for mode in ["legacy", "2026-07-28"]:
        asked = []
        http = create_mcp_http_client()
        with anyio.fail_after(TIMEOUT):
            async with Client(streamable_http_client(url, http_client=http), mode=mode,
                              elicitation_callback=answering("accept", asked)) as client:
                who = f"{mode} (protocol {client.session.protocol_version})"
                r = await client.call_tool("report_with_link", {})
                kinds = [type(c).__name__ for c in r.content]
                assert kinds == ["TextContent", "ImageContent", "ResourceLink"], kinds
                image, link = r.content[1], r.content[2]
                assert image.mime_type == "image/png", image
                assert base64.b64decode(image.data).startswith(b"\x89PNG"), image.data[:16]
                assert str(link.uri) == "https://example.com/data.csv" and link.name == "data.csv", link
                assert link.mime_type == "text/csv", link
                ok(f"{who}: an image and a resource link, as the SDK's ImageContent and ResourceLink")

                audio = (await client.call_tool("test_audio_content", {})).content[0]
                assert type(audio).__name__ == "AudioContent" and audio.mime_type == "audio/wav", audio
                embedded = (await client.call_tool("test_embedded_resource", {})).content[0]
                assert type(embedded).__name__ == "EmbeddedResource", embedded
                assert embedded.resource.text == "This is an embedded resource content.", embedded
                ok(f"{who}: audio and an embedded resource")

                done = await client.call_tool("approval_required", {})
                assert not done.is_error and done.content[0].text == "approved and done", done
                assert len(asked) == 1 and "approval_required" in asked[0], asked
                ok(f"{who}: approval asked by elicitation, accepted, the call ran")

        asked = []
        http = create_mcp_http_client()
        with anyio.fail_after(TIMEOUT):
            async with Client(streamable_http_client(url, http_client=http), mode=mode,
                              elicitation_callback=answering("decline", asked)) as client:
                refused = await client.call_tool("approval_required", {})
                assert refused.is_error and "declined" in refused.content[0].text, refused
                assert len(asked) == 1, asked
                ok(f"{mode}: declined, the call refused")


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        anyio.run(run, sys.argv[1])
    except BaseException as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print(f"mcp content client: FAILED: {e!r}", file=sys.stderr)
        sys.exit(1)
    print(f"mcp content client: {checks} checks passed")


if __name__ == "__main__":
    main()
