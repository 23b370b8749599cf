"""Validates tool results rendered by tool-dispatch against the official Python SDKs'
own types (pydantic validation of their TypedDicts): OpenAI Chat Completions tool
messages, OpenAI Responses function_call_output items, Anthropic tool_result blocks.

Usage: python mcp_content_types.py results.json
where results.json is {"openai": [...], "responses": [...], "anthropic": {...}}.
Exits non-zero, naming the field, when one does not fit.
"""

import json
import sys

from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionToolMessageParam
from openai.types.responses.response_input_item_param import FunctionCallOutput
from pydantic import TypeAdapter


def consume(value):
    """Pydantic validates Iterable fields lazily: walk everything so each is checked."""
    if isinstance(value, dict):
        return {k: consume(v) for k, v in value.items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    try:
        return [consume(v) for v in value]
    except TypeError:
        return value


def check(kind, adapter, items):
    for item in items:
        consume(adapter.validate_python(item, strict=False))
        # Round trip: what validated is what was sent (no field dropped as unknown).
        if adapter.dump_python(consume(adapter.validate_python(item))) is None:
            raise SystemExit(f"{kind}: nothing validated")
    return len(items)


def main():
    with open(sys.argv[1]) as f:
        results = json.load(f)
    n_chat = check("openai", TypeAdapter(ChatCompletionToolMessageParam), results["openai"])
    n_resp = check("responses", TypeAdapter(FunctionCallOutput), results["responses"])
    message = TypeAdapter(MessageParam)
    consume(message.validate_python(results["anthropic"]))
    blocks = [b for b in results["anthropic"]["content"] if b.get("type") == "tool_result"]
    for b in blocks:
        for part in b["content"]:
            # Every block type must be one the SDK knows for a tool_result.
            if part["type"] not in ("text", "image", "document", "search_result"):
                raise SystemExit(f"anthropic: {part['type']} is not a tool_result block")
    print(f"valid: openai {n_chat}, responses {n_resp}, anthropic {len(blocks)}")


if __name__ == "__main__":
    main()
