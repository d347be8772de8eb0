// The stock `graphql-ws` client against the gateway's GraphQL adapter (/graphql, graphql-transport-ws).
// Usage: node graphql_client.mjs WS_URL TOKEN CHANNEL COUNT
// Prints "ready" once subscribed, then one JSON summary after COUNT publications.
import { createClient } from "graphql-ws";
import WebSocket from "ws";

const [url, token, channel, count] = process.argv.slice(2);
const received = [];
const deadline = setTimeout(() => done({ ok: false, reason: "timed out" }), 20000);

function done(summary) {
  clearTimeout(deadline);
  console.log(JSON.stringify({ received, ...summary }));
  process.exit(summary.ok ? 0 : 1);
}

let me = null; // the user the gateway says we are (connection_ack payload)
const client = createClient({
  url,
  webSocketImpl: WebSocket,
  connectionParams: { token },
  retryAttempts: 0,
  lazy: false,
  on: { connected: (socket, payload) => (me = payload.user) },
});
const query = "subscription ($c: String!) { channel(name: $c) { channel offset data } }";

// The permission denied path first: the subscription ends with GraphQL errors (extensions.code 103).
const denied = await new Promise((resolve) => {
  client.subscribe(
    { query, variables: { c: "chat:dialog#zed,yan" } },
    { next: (value) => resolve(value.errors?.[0]?.extensions?.code ?? null), error: (e) => resolve(e[0]?.extensions?.code ?? String(e)), complete: () => {} },
  );
});

client.subscribe(
  { query, variables: { c: channel } },
  {
    next: (value) => {
      if (value.errors) done({ ok: false, reason: JSON.stringify(value.errors) });
      received.push({ data: value.data.channel.data, offset: value.data.channel.offset });
      if (received.length >= Number(count)) done({ ok: true, denied });
    },
    error: (error) => done({ ok: false, reason: String(error) }),
    complete: () => {},
  },
);
// The resolver subscribes as it starts: ready once this user shows in the channel's presence.
const presence = `{ presence(channel: "${channel}") { user } }`;
for (;;) {
  const { value } = await client.iterate({ query: presence }).next();
  if (value?.data?.presence?.some((entry) => entry.user === me)) break;
  await new Promise((resolve) => setTimeout(resolve, 20));
}
console.log("ready");
