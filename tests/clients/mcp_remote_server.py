#!/usr/bin/env python3
"""A small MCP server written with the Python `mcp` SDK (2.x `MCPServer`), over stdio,
for tool-dispatch's import tests: tools to succeed, fail, report progress, outlive a
timeout and die. What happens to it is appended to the file named by
MCP_REMOTE_LOG (one word per line: `started <tool>`, `cancelled <tool>`).
"""
import os

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

LOG = os.environ.get("MCP_REMOTE_LOG")
server = MCPServer("remote-for-tests")


def log(line):
    if LOG:
        with open(LOG, "a") as f:
            f.write(line + "\n")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with the given reason."""
    raise ToolError(f"it failed: {reason}")


@server.tool()
async def count(steps: int, ctx: Context) -> str:
    """Counts to `steps`, reporting progress at each step."""
    for n in range(1, steps + 1):
        await ctx.report_progress(n, steps, f"step {n}")
        await anyio.sleep(0.01)
    return f"counted to {steps}"


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleeps; says so when cancelled."""
    log("started sleep")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        log("cancelled sleep")
        raise
    return "slept"


@server.tool()
def die() -> str:
    """Ends the server process in the middle of the call."""
    log("started die")
    os._exit(3)


if __name__ == "__main__":
    server.run()
