// Two stock socket.io-client sockets against two Tsunagu gateways (rooms are platform channels).
// Usage: node socketio_client.mjs URL1 URL2 TOKEN_A TOKEN_B ROOM
// Prints {"step":"ready"} once both exchanged events; the test then kills gateway 1, A moves to
// URL2 and must recover the events B emitted meanwhile (socket.recovered === true), exactly once.
import { io } from "socket.io-client";

const [url1, url2, tokenA, tokenB, room] = process.argv.slice(2);
const got = { a: [], b: [] };
const acks = [];
const deadline = setTimeout(() => fail("timed out"), 25000);

function fail(reason) {
  console.log(JSON.stringify({ ok: false, reason, got, acks }));
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
const options = (token) => ({ auth: { token }, transports: ["websocket"], reconnectionDelay: 100, reconnectionDelayMax: 300 });
const a = io(url1, options(tokenA));
const b = io(url2, options(tokenB));
a.on("chat", (n) => got.a.push(n));
b.on("chat", (n) => got.b.push(n));
a.on("connect_error", (err) => { if (a.io.uri === url2) fail(`a: ${err.message}`); });
b.on("connect_error", (err) => fail(`b: ${err.message}`));
a.on("disconnect", () => { a.io.uri = url2; });  // its gateway is gone: the other replica serves it

await waitFor(() => a.connected && b.connected);
for (const s of [a, b]) {
  const res = await s.timeout(5000).emitWithAck("join", room);
  if (!res.ok) fail(`join: ${JSON.stringify(res)}`);
}
for (let n = 0; n < 3; n++) acks.push(await b.timeout(5000).emitWithAck("emit", { room, event: "chat", args: [n] }));
await waitFor(() => got.a.length >= 3 && got.b.length >= 3);
console.log(JSON.stringify({ step: "ready" }));

await waitFor(() => !a.connected);
for (let n = 3; n < 6; n++) acks.push(await b.timeout(5000).emitWithAck("emit", { room, event: "chat", args: [n], key: `k${n}` }));
await waitFor(() => a.connected);
await waitFor(() => got.a.length >= 6);
const recovered = a.recovered;
acks.push(await a.timeout(5000).emitWithAck("emit", { room, event: "chat", args: [6] }));
await waitFor(() => got.b.length >= 7);
await new Promise((r) => setTimeout(r, 200));  // a duplicate would show up here
const denied = await b.timeout(5000).emitWithAck("join", "forbidden-room");  // bob may use one room only
clearTimeout(deadline);
console.log(JSON.stringify({ ok: true, got, acks, recovered, denied }));
a.close();
b.close();
process.exit(0);
