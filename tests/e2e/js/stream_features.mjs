// The stock `centrifuge` SDK (npm) asking for the stream features a namespace offers: positioning, cache
// recovery (`since: {}`: the latest publication on every subscribe) and a tags filter.
// Usage: node stream_features.mjs WS_URL TOKEN PREFIX API_URL API_KEY  -> prints one JSON summary.
// PREFIX names the channels: `<positioned ns>:PREFIX`, `<cache ns>:PREFIX`, `<filtered ns>:PREFIX`.
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

const [url, token, prefix, apiUrl, apiKey] = process.argv.slice(2);
const channels = { positioned: `ticks:${prefix}`, cache: `scores:${prefix}`, filtered: `quotes:${prefix}` };
const summary = { ok: false, subscribed: {}, received: { cache: [], filtered: [] } };
const deadline = setTimeout(() => finish("timed out"), 20000);

function finish(reason) {
  clearTimeout(deadline);
  summary.reason = reason;
  console.log(JSON.stringify(summary));
  process.exit(summary.ok ? 0 : 1);
}

const waitFor = (condition) =>
  new Promise((resolve) => {
    const poll = setInterval(() => condition() && (clearInterval(poll), resolve()), 10);
  });

async function publish(channel, data, tags) {
  const response = await fetch(`${apiUrl}/publish`, {
    method: "POST",
    headers: { "X-API-Key": apiKey, "Content-Type": "application/json" },
    body: JSON.stringify({ channel, data, tags }),
  });
  const answer = await response.json();
  if (answer.error) finish(`publish failed: ${JSON.stringify(answer.error)}`);
}

function watch(kind, sub) {
  summary.subscribed[kind] = [];
  sub.on("subscribed", (ctx) =>
    summary.subscribed[kind].push({
      positioned: ctx.positioned,
      recoverable: ctx.recoverable,
      recovered: ctx.recovered,
      offset: Number(ctx.streamPosition?.offset ?? 0),
    }),
  );
  sub.on("publication", (ctx) => summary.received[kind]?.push({ data: ctx.data, tags: ctx.tags ?? {} }));
  sub.subscribe();
}

await publish(channels.positioned, { n: 1 });
for (const score of ["0-0", "1-0"]) await publish(channels.cache, { score });

const client = new Centrifuge(url, { token, websocket: WebSocket, minReconnectDelay: 50, maxReconnectDelay: 500 });
client.connect();
watch("positioned", client.newSubscription(channels.positioned, { positioned: true }));
watch("cache", client.newSubscription(channels.cache, { since: {} }));
watch("filtered", client.newSubscription(channels.filtered, { tagsFilter: { key: "ticker", cmp: "eq", val: "AAPL" } }));
await waitFor(() => Object.values(summary.subscribed).every((events) => events.length === 1));
await waitFor(() => summary.received.cache.length === 1);

for (const ticker of ["MSFT", "AAPL", "GOOG", "AAPL"]) await publish(channels.filtered, { ticker }, { ticker });
await waitFor(() => summary.received.filtered.length === 2);

// Away while the score changes twice: back, the cache subscription gets only the latest one.
client.disconnect();
for (const score of ["2-0", "2-1"]) await publish(channels.cache, { score });
client.connect();
await waitFor(() => summary.received.cache.length === 2);
await new Promise((resolve) => setTimeout(resolve, 300));
client.disconnect();
summary.ok = true;
finish("done");
