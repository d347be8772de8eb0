// The stock `centrifuge` SDK (npm) as a recovering subscriber that outlives its gateway.
// Usage: node recovering_subscriber.mjs WS_URL TOKEN CHANNEL COUNT TIMEOUT_SECONDS
// Prints "ready" once subscribed; once COUNT publications arrived (or at the timeout) one JSON summary:
// every publication's `n` and offset in arrival order and every `subscribed` event.
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

const [url, token, channel, count, timeoutSeconds] = process.argv.slice(2);
const received = [];
const subscribed = [];
const disconnects = [];
const deadline = setTimeout(() => done(false), Number(timeoutSeconds) * 1000);

function done(ok) {
  clearTimeout(deadline);
  console.log(JSON.stringify({ ok, received, subscribed, disconnects }));
  process.exit(ok ? 0 : 1);
}

// The SDK's own reconnect backoff, only capped lower than its 20 s default so a test does not wait long.
const client = new Centrifuge(url, { token, websocket: WebSocket, maxReconnectDelay: 1000 });
client.on("disconnected", (ctx) => disconnects.push(ctx.code));
client.on("connecting", (ctx) => ctx.code !== 0 && disconnects.push(ctx.code));
const sub = client.newSubscription(channel, { recoverable: true, positioned: true });
sub.on("subscribed", (ctx) => {
  subscribed.push({ recovered: ctx.recovered, wasRecovering: ctx.wasRecovering, offset: Number(ctx.streamPosition?.offset ?? 0) });
  if (subscribed.length === 1) console.log("ready");
});
sub.on("publication", (ctx) => {
  received.push({ n: ctx.data.n, offset: Number(ctx.offset) });
  if (received.length >= Number(count)) {
    client.disconnect();
    done(true);
  }
});
client.connect();
sub.subscribe();
