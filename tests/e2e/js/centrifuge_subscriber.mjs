// The stock `centrifuge` SDK (npm) as a plain subscriber.
// Usage: node centrifuge_subscriber.mjs WS_URL TOKEN CHANNEL COUNT
// Prints "ready" once subscribed, then one JSON summary after COUNT publications.
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

const [url, token, channel, count] = process.argv.slice(2);
const received = [];
const deadline = setTimeout(() => done({ ok: false, reason: "timed out" }), 20000);

function done(summary) {
  clearTimeout(deadline);
  console.log(JSON.stringify({ received, ...summary }));
  process.exit(summary.ok ? 0 : 1);
}

const client = new Centrifuge(url, { token, websocket: WebSocket });
const sub = client.newSubscription(channel);
sub.on("subscribed", () => console.log("ready"));
sub.on("error", (ctx) => done({ ok: false, reason: JSON.stringify(ctx.error) }));
sub.on("publication", (ctx) => {
  received.push({ data: ctx.data, offset: Number(ctx.offset) });
  if (received.length >= Number(count)) {
    client.disconnect();
    done({ ok: true });
  }
});
client.connect();
sub.subscribe();
