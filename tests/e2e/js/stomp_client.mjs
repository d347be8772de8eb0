// The stock `@stomp/stompjs` client against the gateway's STOMP 1.2 adapter (/stomp).
// Usage: node stomp_client.mjs WS_URL TOKEN CHANNEL COUNT
// Prints "ready" once subscribed, then one JSON summary after COUNT messages.
import { Client } from "@stomp/stompjs";
import WebSocket from "ws";

Object.assign(global, { WebSocket });
const [url, token, channel, count] = process.argv.slice(2);
const received = [];
const deadline = setTimeout(() => done({ ok: false, reason: "timed out" }), 20000);

function done(summary) {
  clearTimeout(deadline);
  console.log(JSON.stringify({ received, ...summary }));
  process.exit(summary.ok ? 0 : 1);
}

const client = new Client({
  webSocketFactory: () => new WebSocket(url, ["v12.stomp"]),
  connectHeaders: { login: "ignored", passcode: token },
  heartbeatIncoming: 1000,
  heartbeatOutgoing: 1000,
  reconnectDelay: 0,
});
client.onStompError = (frame) => done({ ok: false, reason: frame.headers.message });
client.onConnect = (connected) => {
  client.watchForReceipt("subscribed", () => console.log("ready"));
  client.subscribe(
    `/topic/${channel}`,
    (message) => {
      received.push({
        data: JSON.parse(message.body),
        offset: Number(message.headers.offset),
        subscription: message.headers.subscription,
        contentType: message.headers["content-type"],
      });
      if (received.length >= Number(count)) denied(connected.headers["user-name"]);
    },
    { id: "sub-0", receipt: "subscribed" },
  );
};
client.activate();

// A publish the user may not make: an ERROR frame, then the connection closes.
function denied(user) {
  client.onStompError = (frame) => {
    client.deactivate();
    done({ ok: true, user, denied: frame.headers.message });
  };
  client.publish({ destination: "/topic/chat:dialog#zed,yan", body: "{}" });
}
