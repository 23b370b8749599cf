// The TypeScript MCP client (@modelcontextprotocol/client, v2) against tool-dispatch's
// MCP server over streamable HTTP: list and call, as alice and as bob.
// Usage: node mcp_ts_client.mjs http://127.0.0.1:PORT/mcp   (exits 0 when every check passes)
import { Client, StreamableHTTPClientTransport } from '@modelcontextprotocol/client';

const url = new URL(process.argv[2]);
let checks = 0;
const ok = (what) => { checks += 1; console.log(`  ok: ${what}`); };
const fail = (what) => { throw new Error(what); };

async function as(token, who, admin) {
  const transport = new StreamableHTTPClientTransport(url, {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
  const client = new Client({ name: 'tool-dispatch-e2e', version: '1.0.0' });
  await client.connect(transport);
  const { tools } = await client.listTools();
  const names = tools.map((t) => t.name);
  const expected = ['get_weather', 'send_email', 'slow_task', ...(admin ? ['list_users'] : []), 'firehose'];
  if (JSON.stringify(names) !== JSON.stringify(expected)) fail(`${who}: tools ${names}`);
  ok(`${who}: tools/list`);
  const result = await client.callTool({ name: 'get_weather', arguments: { city: 'Paris' } });
  if (result.isError || result.structuredContent?.temp_c !== 21) fail(`${who}: ${JSON.stringify(result)}`);
  ok(`${who}: tools/call get_weather`);
  const bad = await client.callTool({ name: 'get_weather', arguments: { city: 5 } });
  if (!bad.isError || !JSON.stringify(bad.content).includes('city')) fail(`${who}: ${JSON.stringify(bad)}`);
  ok(`${who}: invalid input is an error result`);
  if (!admin) {
    const denied = await client.callTool({ name: 'list_users', arguments: {} });
    if (!denied.isError) fail(`${who}: list_users was not denied`);
    ok(`${who}: a tool outside the scopes is denied`);
  }
  await client.close();
}

try {
  await as('alice-token', 'alice', true);
  await as('bob-token', 'bob', false);
  console.log(`mcp ts client: ${checks} checks passed`);
} catch (e) {
  console.error(`mcp ts client: FAILED: ${e?.stack ?? e}`);
  process.exit(1);
}
