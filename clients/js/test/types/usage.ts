// Type-checked by test/types.test.js (tsc --noEmit): the declarations as an app uses
// them, and misuse that must not compile.
import {
  AuthError,
  ToolDispatchClient,
  connect,
  memoryStorage,
  type ClientEvent,
  type ToolCompletedFrame,
} from "@tool-dispatch/client";

const client = connect({ url: "ws://127.0.0.1:3000/ws", token: "alice-token", storage: memoryStorage() });
client.on("tool_completed", (e) => {
  const status: string = e.status;
  const ms: number = e.duration_ms;
  const seq: number = e.seq;
  void [status, ms, seq];
});
client.on("tool_approval_required", (e) => client.approve(e.call_id));
client.on("state", (e) => {
  if (e.state === "closed" && e.error instanceof AuthError) console.log(e.error.status);
});
client.on("malformed_frame", (e) => console.log(e.error.excerpt));
client.on("resync_required", (e) => console.log(e.reason, client.runId));
client.on("shiny_new_frame", (e) => console.log(e.type));
client.on("*", (e: ClientEvent) => console.log(e.type));

const runId: string = client.sendTurn({
  role: "assistant",
  tool_calls: [{ id: "call_1", type: "function", function: { name: "get_weather", arguments: "{\"city\":\"Paris\"}" } }],
});
client.reject("call_2", "not now");
client.cancel(runId);

async function read(c: ToolDispatchClient): Promise<ToolCompletedFrame | undefined> {
  await c.whenOpen({ timeoutMs: 1000 });
  const done = await c.waitFor("tool_completed", (e) => e.status === "success");
  for await (const e of c.events({ bufferSize: 16 })) {
    switch (e.type) {
      case "tool_progress":
        console.log(e.progress);
        break;
      case "dropped":
        console.log(e.count);
        break;
      case "tool_results":
        console.log(e.call_ids.join());
        return done;
    }
  }
  return undefined;
}
void read(new ToolDispatchClient({ url: new URL("http://127.0.0.1:3000/ws"), token: async () => "t" }));

// Misuse: each line must be an error.
// @ts-expect-error a call id is a string
client.approve(42);
// @ts-expect-error a turn is an object
client.sendTurn("hello");
// @ts-expect-error the url is required
new ToolDispatchClient({ token: "t" });
// @ts-expect-error a known event's fields are typed
client.on("tool_progress", (e) => { const s: string = e.progress; void s; });
// @ts-expect-error state is read-only
client.state = "open";
