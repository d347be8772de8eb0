// The stock `centrifuge` SDK (npm) with COUNT subscriptions created before connect(): the SDK sends them in
// one frame with the connect command. Usage: node many_subscriptions.mjs WS_URL TOKEN PREFIX COUNT
// Prints one JSON summary: how many subscribed, and every error or disconnect seen.
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

const [url, token, prefix, count] = process.argv.slice(2);
const subscribed = new Set();
const errors = [];
const deadline = setTimeout(() => done(false), 20000);

function done(ok) {
  clearTimeout(deadline);
  console.log(JSON.stringify({ ok, subscribed: subscribed.size, errors }));
  process.exit(ok ? 0 : 1);
}

const client = new Centrifuge(url, { token, websocket: WebSocket });
client.on("disconnected", (ctx) => errors.push({ disconnected: ctx.code, reason: ctx.reason }));
client.on("connecting", (ctx) => ctx.code !== 0 && errors.push({ connecting: ctx.code, reason: ctx.reason }));
for (let n = 0; n < Number(count); n++) {
  const sub = client.newSubscription(`${prefix}${n}`);
  sub.on("subscribed", () => {
    subscribed.add(n);
    if (subscribed.size === Number(count)) {
      const ok = errors.length === 0;
      client.removeAllListeners("disconnected");
      client.disconnect();
      done(ok);
    }
  });
  sub.on("error", (ctx) => errors.push({ channel: n, error: ctx.error }));
  sub.subscribe();
}
client.connect();
