// The network between Chromium and the gateway, as a TCP proxy that reads the native protocol's
// WebSocket frames (JSON: one command or reply per line) and records every `$publish` RPC on the wire:
// which connection sent it, its idempotency key and text, when, and the offset the gateway answered.
// It can lose the gateway's reply to one publish by cutting the connection (the gateway applied it, the
// page never hears so), and hold replies back (a slow network) until told to let them through.
//
// Why a proxy and not Chromium's own network emulation: DevTools' Network.emulateNetworkConditions
// (Playwright's setOffline) cuts the connection at a moment the test picks, not between the gateway
// applying a publish and its reply reaching the page, a window of a millisecond; DevTools only reports
// WebSocket frames after the fact, it cannot stop one. Playwright's routeWebSocket could stop the
// frame, but it swaps the page's WebSocket for an in-page mock, so the browser's own WebSocket would
// not be under test. Here both ends are real: Chromium's WebSocket over TCP and the gateway's session;
// the proxy sees the reply, so the publish was applied, and resets the TCP connection instead of
// forwarding it, which is what a network failing at that moment looks like to both of them.
import net from 'node:net';

const HEAD_END = Buffer.from('\r\n\r\n');

/** One WebSocket frame at the start of `buffer` (RFC 6455 section 5.2), or null until it is complete. */
function takeFrame(buffer) {
  if (buffer.length < 2) return null;
  const masked = (buffer[1] & 0x80) !== 0;
  let length = buffer[1] & 0x7f;
  let at = 2;
  if (length === 126) {
    if (buffer.length < 4) return null;
    length = buffer.readUInt16BE(2);
    at = 4;
  } else if (length === 127) {
    if (buffer.length < 10) return null;
    length = Number(buffer.readBigUInt64BE(2));
    at = 10;
  }
  const mask = at;
  if (masked) at += 4;
  if (buffer.length < at + length) return null;
  const payload = Buffer.from(buffer.subarray(at, at + length));
  if (masked) for (let i = 0; i < length; i++) payload[i] ^= buffer[mask + (i % 4)];
  return { fin: (buffer[0] & 0x80) !== 0, opcode: buffer[0] & 0x0f, payload, raw: buffer.subarray(0, at + length) };
}

/** The JSON lines of a text message (the protocol's batches); lines that are not JSON are skipped. */
function jsonLines(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    try {
      out.push(JSON.parse(line));
    } catch {
      // not the JSON protocol (another WebSocket of the page): nothing to record
    }
  }
  return out;
}

/**
 * Calls `onMessage(text, raw)` for each complete text message read from `socket` (starting with the
 * bytes `initial` already read), `raw` being its frames as they came, to forward; binary and control
 * frames go to `onOther(raw)`.
 */
function readFrames(socket, initial, onMessage, onOther) {
  let buffer = initial;
  let fragments = [];
  let raws = [];
  const drain = () => {
    for (let frame = takeFrame(buffer); frame; frame = takeFrame(buffer)) {
      buffer = buffer.subarray(frame.raw.length);
      const raw = Buffer.from(frame.raw);
      if (frame.opcode === 1 || (frame.opcode === 0 && raws.length > 0)) {
        fragments.push(frame.payload);
        raws.push(raw);
        if (frame.fin) {
          onMessage(Buffer.concat(fragments).toString('utf8'), Buffer.concat(raws));
          fragments = [];
          raws = [];
        }
      } else {
        onOther(raw);
      }
    }
  };
  socket.on('data', (chunk) => {
    buffer = buffer.length ? Buffer.concat([buffer, chunk]) : chunk;
    drain();
  });
  drain();
}

/** Reads an HTTP head (up to the blank line) from `socket`; resolves with it and the bytes after it. */
function readHead(socket) {
  return new Promise((resolve, reject) => {
    let buffer = Buffer.alloc(0);
    const onData = (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      const end = buffer.indexOf(HEAD_END);
      if (end < 0) return;
      socket.off('data', onData);
      socket.off('error', reject);
      socket.pause();
      resolve({ head: buffer.subarray(0, end + 4).toString('latin1'), rest: buffer.subarray(end + 4) });
    };
    socket.on('data', onData);
    socket.once('error', reject);
  });
}

export class LossyProxy {
  constructor(target) {
    const url = new URL(target);
    this.target = { host: url.hostname, port: Number(url.port) };
    /** Every `$publish` seen: {connection, id, key, text, sentAt, repliedAt?, offset?, error?, fate}. */
    this.publishes = [];
    /** WebSocket connections opened so far (1, 2, ...); `open` of them are still up. */
    this.connections = 0;
    this.open = 0;
    this.loseReply = null;
    this.gate = null;
    this.sockets = new Set();
    this.server = net.createServer((client) => this.accept(client));
  }

  /** Listens on 127.0.0.1:`port` and forwards to `target` (the gateway's base URL). */
  static async start(port, target) {
    const proxy = new LossyProxy(target);
    await new Promise((resolve, reject) => {
      proxy.server.once('error', reject);
      proxy.server.listen(port, '127.0.0.1', resolve);
    });
    proxy.base = `http://127.0.0.1:${port}`;
    return proxy;
  }

  /** The next reply to a `$publish` for which `matches(publish)` is true is lost with its connection. */
  loseReplyTo(matches) {
    this.loseReply = matches;
  }

  /** Replies to `$publish` wait until the returned function is called (in order, nothing else overtakes). */
  holdReplies() {
    let release;
    this.gate = new Promise((resolve) => (release = resolve));
    return () => {
      this.gate = null;
      release();
    };
  }

  close() {
    for (const socket of this.sockets) socket.destroy();
    return new Promise((resolve) => this.server.close(resolve));
  }

  async accept(client) {
    this.sockets.add(client);
    client.on('close', () => this.sockets.delete(client));
    client.on('error', () => {});
    const upstream = net.connect(this.target);
    this.sockets.add(upstream);
    upstream.on('close', () => this.sockets.delete(upstream));
    upstream.on('error', () => {});
    const closeBoth = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('close', closeBoth);
    upstream.on('close', closeBoth);
    let request;
    try {
      request = await readHead(client);
    } catch {
      closeBoth();
      return;
    }
    if (!/^upgrade:\s*websocket\s*$/im.test(request.head)) {
      // Plain HTTP (the app, its config, auth is elsewhere): bytes through, untouched.
      upstream.write(request.head);
      upstream.write(request.rest);
      client.pipe(upstream);
      upstream.pipe(client);
      client.resume();
      return;
    }
    // No permessage-deflate: the frames must be readable here. Dropping the offer is a normal outcome
    // of the handshake (the server then answers without it), not a change of protocol.
    upstream.write(request.head.replace(/^sec-websocket-extensions:.*\r\n/gim, ''));
    this.connections += 1;
    this.open += 1;
    client.once('close', () => (this.open -= 1));
    this.relay(this.connections, client, upstream, request.rest);
  }

  relay(connection, client, upstream, early) {
    const pending = new Map(); // command id -> publish record, per connection
    readFrames(
      client,
      early,
      (text, raw) => {
        for (const command of jsonLines(text)) {
          if (command?.rpc?.method !== '$publish') continue;
          const data = command.rpc.data ?? {};
          const record = {
            connection,
            id: command.id,
            key: data.idempotency_key ?? null,
            channel: data.channel,
            text: data.data?.text ?? null,
            sentAt: Date.now(),
            fate: 'in flight',
          };
          this.publishes.push(record);
          pending.set(command.id, record);
        }
        upstream.write(raw);
      },
      (raw) => upstream.write(raw),
    );
    client.resume();

    let toClient = Promise.resolve();
    let handshake = true;
    let head = Buffer.alloc(0);
    const fromServer = (text, raw) => {
      const replies = jsonLines(text)
        .map((reply) => ({ reply, publish: pending.get(reply?.id) }))
        .filter(({ publish }) => publish !== undefined);
      for (const { reply, publish } of replies) {
        pending.delete(reply.id);
        publish.offset = reply.rpc?.data?.offset;
        publish.epoch = reply.rpc?.data?.epoch;
        if (reply.error) publish.error = reply.error;
      }
      const lost = replies.find(({ publish }) => this.loseReply?.(publish));
      if (lost) {
        this.loseReply = null;
        for (const { publish } of replies) publish.fate = 'reply lost';
        // After whatever is already on its way to the page: then the TCP connection fails (RST).
        toClient = toClient.then(() => {
          client.resetAndDestroy();
          upstream.destroy();
        });
        return;
      }
      const gate = replies.length > 0 ? this.gate : null;
      toClient = toClient.then(async () => {
        if (gate) await gate;
        const gone = client.destroyed;
        if (!gone) client.write(raw);
        for (const { publish } of replies) {
          publish.fate = gone ? 'reply lost' : 'delivered';
          if (!gone) publish.repliedAt = Date.now();
        }
      });
    };
    upstream.on('data', function onHead(chunk) {
      if (!handshake) return;
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf(HEAD_END);
      if (end < 0) return;
      handshake = false;
      upstream.off('data', onHead);
      client.write(head.subarray(0, end + 4));
      readFrames(upstream, head.subarray(end + 4), fromServer, (other) => {
        toClient = toClient.then(() => {
          if (!client.destroyed) client.write(other);
        });
      });
    });
  }
}
