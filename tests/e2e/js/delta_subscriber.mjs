// The stock `centrifuge` SDK (npm) on a channel with fossil deltas: one subscriber asks for `delta: 'fossil'`,
// one does not; both get the same publications, the first through deltas (the SDK decodes them), and it
// reconnects halfway to recover what it missed in full before deltas resume.
// Usage: node delta_subscriber.mjs WS_URL TOKEN CHANNEL API_URL API_KEY json|protobuf -> one JSON summary.
import { Centrifuge as JsonCentrifuge } from "centrifuge";
import { Centrifuge as ProtobufCentrifuge } from "centrifuge/build/protobuf";
import WebSocket from "ws";

const [url, token, channel, apiUrl, apiKey, format] = process.argv.slice(2);
const Centrifuge = format === "protobuf" ? ProtobufCentrifuge : JsonCentrifuge;
const decoder = new TextDecoder();
const summary = { ok: false, received: { delta: [], full: [] }, subscribed: [], stats: null };
const deadline = setTimeout(() => finish("timed out"), 30000);

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

async function publish(n) {
  const data = {
    symbol: "ACME",
    name: "Acme Corporation ordinary shares",
    exchange: "XTKS",
    currency: "JPY",
    price: 1000 + n * 0.25,
    volume: 1250000 + n * 37,
    n,
  };
  const response = await fetch(`${apiUrl}/publish`, {
    method: "POST",
    headers: { "X-API-Key": apiKey, "Content-Type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const answer = await response.json();
  if (answer.error) finish(`publish failed: ${JSON.stringify(answer.error)}`);
}

// A protobuf client gets the payload's bytes.
const payload = (data) => (data instanceof Uint8Array ? JSON.parse(decoder.decode(data)) : data);

function client() {
  return new Centrifuge(url, { token, websocket: WebSocket, minReconnectDelay: 50, maxReconnectDelay: 500 });
}

const withDelta = client();
const withoutDelta = client();
const deltaSub = withDelta.newSubscription(channel, { delta: "fossil" });
const fullSub = withoutDelta.newSubscription(channel);
deltaSub.on("subscribed", (ctx) => summary.subscribed.push({ recovered: ctx.recovered, wasRecovering: ctx.wasRecovering }));
deltaSub.on("publication", (ctx) => summary.received.delta.push(payload(ctx.data)));
fullSub.on("publication", (ctx) => summary.received.full.push(payload(ctx.data)));
withDelta.connect();
withoutDelta.connect();
deltaSub.subscribe();
fullSub.subscribe();
await waitFor(() => summary.subscribed.length === 1 && fullSub.state === "subscribed");

for (let n = 0; n < 20; n++) await publish(n);
await waitFor(() => summary.received.delta.length === 20);
withDelta.disconnect();
for (let n = 20; n < 30; n++) await publish(n);
withDelta.connect();
await waitFor(() => summary.subscribed.length === 2);
for (let n = 30; n < 50; n++) await publish(n);
await waitFor(() => summary.received.delta.length === 50 && summary.received.full.length === 50);
summary.stats = deltaSub.deltaStats();
withDelta.disconnect();
withoutDelta.disconnect();
summary.ok = true;
finish("done");
