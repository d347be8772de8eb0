// The stock `rpc-websockets` client against the gateway's JSON-RPC 2.0 adapter (/rpc).
// Usage: node jsonrpc_client.mjs WS_URL TOKEN CHANNEL COUNT
// Prints "ready" once subscribed, then one JSON summary after COUNT publications.
import { Client } from "rpc-websockets";

const [url, token, channel, count] = process.argv.slice(2);
const received = [];
const deadline = setTimeout(() => done({ ok: false, reason: "timed out" }), 20000);

function done(summary) {
  clearTimeout(deadline);
  console.log(JSON.stringify({ received, ...summary }));
  process.exit(summary.ok ? 0 : 1);
}

const client = new Client(`${url}?token=${encodeURIComponent(token)}`, { autoconnect: true, reconnect: false });
client.on("error", (error) => done({ ok: false, reason: String(error) }));
client.on("open", async () => {
  let denied = null;
  try {
    await client.call("subscribe", { channel: "chat:dialog#zed,yan" });
  } catch (error) {
    denied = error.code;
  }
  client.on("subscription", (params) => {
    received.push({ data: params.result.data, offset: params.result.offset, subscription: params.subscription });
    if (received.length >= Number(count)) done({ ok: true, denied });
  });
  const id = await client.call("subscribe", { channel });
  if (id !== channel) done({ ok: false, reason: `subscription id ${id}` });
  console.log("ready");
});
