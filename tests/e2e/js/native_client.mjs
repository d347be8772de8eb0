// The stock `centrifuge` SDK (npm) against a Tsunagu gateway: subscribe, publish, history,
// disconnect, miss publications made through the server API, reconnect and recover them.
// Usage: node native_client.mjs WS_URL TOKEN CHANNEL API_URL API_KEY  -> prints one JSON summary.
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

const [url, token, channel, apiUrl, apiKey] = process.argv.slice(2);
const received = [];
const subscribedEvents = [];
const deadline = setTimeout(() => fail("timed out"), 20000);

function fail(reason) {
  console.log(JSON.stringify({ ok: false, reason, received, subscribedEvents }));
  process.exit(1);
}

function waitFor(condition) {
  return new Promise((resolve) => {
    const poll = setInterval(() => {
      if (condition()) {
        clearInterval(poll);
        resolve();
      }
    }, 10);
  });
}

async function apiPublish(data) {
  const response = await fetch(`${apiUrl}/publish`, {
    method: "POST",
    headers: { "X-API-Key": apiKey, "Content-Type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const body = await response.json();
  if (!body.result) fail(`api publish failed: ${JSON.stringify(body)}`);
}

const client = new Centrifuge(url, { token, websocket: WebSocket, minReconnectDelay: 100 });
const sub = client.newSubscription(channel, { recoverable: true });
sub.on("publication", (ctx) => received.push({ data: ctx.data, offset: ctx.offset }));
sub.on("subscribed", (ctx) => subscribedEvents.push({ recovered: ctx.recovered, wasRecovering: ctx.wasRecovering }));
sub.on("error", (ctx) => fail(`subscription error ${JSON.stringify(ctx.error)}`));

client.connect();
sub.subscribe();
await sub.ready(5000);
for (let n = 0; n < 3; n++) await sub.publish({ n });
await waitFor(() => received.length >= 3);
const history = await sub.history({ limit: 10 });

client.disconnect();
for (let n = 3; n < 6; n++) await apiPublish({ n });
client.connect();
await waitFor(() => received.length >= 6);
await sub.publish({ n: 6 });
await waitFor(() => received.length >= 7);

let forbidden = null;
try {
  await client.publish("secret:plans", { n: -1 });
} catch (error) {
  forbidden = error.code;
}

clearTimeout(deadline);
client.disconnect();
console.log(JSON.stringify({
  ok: true,
  received,
  historyOffsets: history.publications.map((p) => p.offset),
  subscribedEvents,
  forbidden,
}));
