import { afterEach, describe, expect, it } from 'vitest';
import {
  OfflinePublisher,
  type Ack,
  type FailedPublication,
  type OfflinePublisherOptions,
  type QueuedPublication,
} from '../src/index.js';
import { FakeClient, FakeGateway, FakeLocks, eventually, freshBrowser, sleep } from './fakes.js';

const open: OfflinePublisher[] = [];

async function openPublisher(client: FakeClient, options: OfflinePublisherOptions): Promise<OfflinePublisher> {
  const publisher = await OfflinePublisher.open(client, { retryDelayMs: 5, locks: null, ...options });
  open.push(publisher);
  return publisher;
}

afterEach(() => {
  for (const publisher of open.splice(0)) publisher.close();
});

describe('OfflinePublisher', () => {
  it('queues while disconnected and sends in order on connect', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    const publisher = await openPublisher(client, freshBrowser());
    const acks: Ack[] = [];
    publisher.on('acked', (ack) => acks.push(ack));

    const a = await publisher.publish('chat:1', { text: 'a' });
    const b = await publisher.publish('chat:1', { text: 'b' });
    const c = await publisher.publish('chat:2', { text: 'c' });
    expect(b.seq).toBeGreaterThan(a.seq);
    expect(c.seq).toBeGreaterThan(b.seq);
    await publisher.flush(); // not connected: a no-op
    await sleep(20);
    expect(gateway.received).toEqual([]);
    expect(client.rpcMethods).toEqual([]);
    expect((await publisher.pending()).map((p) => p.key)).toEqual([a.key, b.key, c.key]);

    client.connect();
    await eventually(async () => expect(await publisher.pending()).toEqual([]));
    expect(gateway.received.map((s) => s.data)).toEqual([{ text: 'a' }, { text: 'b' }, { text: 'c' }]);
    expect(gateway.keysReceived()).toEqual([a.key, b.key, c.key]);
    expect(new Set(client.rpcMethods)).toEqual(new Set(['$publish']));
    expect(acks).toEqual([
      { key: a.key, channel: 'chat:1', data: { text: 'a' }, offset: 1, epoch: 'epoch-1' },
      { key: b.key, channel: 'chat:1', data: { text: 'b' }, offset: 2, epoch: 'epoch-1' },
      { key: c.key, channel: 'chat:2', data: { text: 'c' }, offset: 3, epoch: 'epoch-1' },
    ]);
  });

  it('sends right after publish() when connected, and stores what goes over the wire', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    client.connect();
    const publisher = await openPublisher(client, freshBrowser());
    const when = new Date(Date.UTC(2026, 10, 25));
    const entry = await publisher.publish('chat:1', { when, skip: undefined });
    expect(entry.data).toEqual({ when: when.toISOString() });
    expect(entry.key).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    await eventually(() => expect(gateway.applied).toHaveLength(1));
    expect(gateway.applied[0]).toMatchObject({ key: entry.key, data: { when: when.toISOString() } });
    await expect(publisher.publish('', 1)).rejects.toThrow(TypeError);
    await expect(publisher.publish('chat:1', () => 1)).rejects.toThrow(TypeError);
    await expect(publisher.publish('chat:1', { n: 1n })).rejects.toThrow();
  });

  it('removes an entry only after its ack', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    const publisher = await openPublisher(client, freshBrowser());
    const entry = await publisher.publish('chat:1', 'hello');
    gateway.hold();
    client.connect();
    await eventually(() => expect(gateway.received).toHaveLength(1));
    await sleep(20);
    // Received and applied by the gateway, but not acknowledged to the client yet: still queued.
    expect(gateway.applied).toHaveLength(1);
    const pending = await publisher.pending();
    expect(pending).toHaveLength(1);
    expect(pending[0]).toMatchObject({ key: entry.key, attempts: 1 });
    gateway.release();
    await eventually(async () => expect(await publisher.pending()).toEqual([]));
  });

  it('after a reload resends what was not acked with the same idempotency key, applied once', async () => {
    const browser = freshBrowser();
    const gateway = new FakeGateway();
    const tab = new FakeClient(gateway, 'before-reload');
    const first = await openPublisher(tab, browser);
    const a = await first.publish('chat:1', 'a');
    const b = await first.publish('chat:1', 'b');
    gateway.hold(); // the page dies while waiting for the first ack
    tab.connect();
    await eventually(() => expect(gateway.received).toHaveLength(1));
    tab.crash();

    const reloaded = new FakeClient(gateway, 'after-reload');
    gateway.release();
    const second = await openPublisher(reloaded, browser);
    expect((await second.pending()).map((p) => [p.key, p.attempts])).toEqual([
      [a.key, 1],
      [b.key, 0],
    ]);
    const acks: Ack[] = [];
    second.on('acked', (ack) => acks.push(ack));
    reloaded.connect();
    await eventually(async () => expect(await second.pending()).toEqual([]));
    expect(gateway.keysReceived()).toEqual([a.key, a.key, b.key]); // resent with the SAME key
    expect(gateway.applied.map((x) => x.key)).toEqual([a.key, b.key]); // ... and applied once
    expect(acks.map((x) => [x.key, x.offset])).toEqual([
      [a.key, 1],
      [b.key, 2],
    ]);
    // seq keeps increasing across reloads even though the queue is empty now
    const c = await second.publish('chat:1', 'c');
    expect(c.seq).toBeGreaterThan(b.seq);
  });

  it('a reply lost to a network drop is resent on reconnect with the same key, not doubled', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    const publisher = await openPublisher(client, freshBrowser());
    const acks: Ack[] = [];
    publisher.on('acked', (ack) => acks.push(ack));
    gateway.script.push({ loseReply: true });
    const a = await publisher.publish('chat:1', 'a');
    const b = await publisher.publish('chat:1', 'b');
    client.connect();
    await eventually(() => expect(client.state).toBe('disconnected'));
    await sleep(30); // retries while disconnected are no-ops
    expect(gateway.keysReceived()).toEqual([a.key]);
    expect((await publisher.pending()).map((p) => p.key)).toEqual([a.key, b.key]);
    client.connect();
    await eventually(async () => expect(await publisher.pending()).toEqual([]));
    expect(gateway.keysReceived()).toEqual([a.key, a.key, b.key]);
    expect(gateway.applied.map((x) => x.data)).toEqual(['a', 'b']);
    expect(acks.map((x) => x.offset)).toEqual([1, 2]);
  });

  it('keeps the entry on temporary errors and retries with backoff, never sending the next one first', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    client.connect();
    const publisher = await openPublisher(client, freshBrowser());
    const retries: number[] = [];
    publisher.on('retry', (r) => retries.push(r.error.code));
    const failed: FailedPublication[] = [];
    publisher.on('failed', (f) => failed.push(f));
    gateway.script.push(
      { error: { code: 100, message: 'internal server error' } },
      { error: { code: 1, message: 'timeout' } },
      { error: { code: 109, message: 'token expired' } },
      { error: { code: 111, message: 'too many requests' } },
      { error: { code: 108, message: 'not available', temporary: true } },
    );
    const a = await publisher.publish('chat:1', 'a');
    const b = await publisher.publish('chat:1', 'b');
    await eventually(async () => expect(await publisher.pending()).toEqual([]));
    expect(retries).toEqual([100, 1, 109, 111, 108]);
    expect(failed).toEqual([]);
    expect(gateway.keysReceived()).toEqual([a.key, a.key, a.key, a.key, a.key, a.key, b.key]);
    expect(gateway.applied.map((x) => x.key)).toEqual([a.key, b.key]);
  });

  it('moves permanently refused entries to failed and goes on with the next', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    const publisher = await openPublisher(client, freshBrowser());
    const failedEvents: FailedPublication[] = [];
    publisher.on('failed', (f) => failedEvents.push(f));
    const codes = [103, 107, 102, 440, 443];
    for (const code of codes) gateway.script.push({ error: { code, message: `refused ${code}` } });
    const refused: QueuedPublication[] = [];
    for (const code of codes) refused.push(await publisher.publish('chat:1', code));
    const ok = await publisher.publish('chat:1', 'ok');
    client.connect();
    await eventually(async () => expect(await publisher.pending()).toEqual([]));
    expect(gateway.applied.map((x) => x.key)).toEqual([ok.key]);
    const failed = await publisher.failed();
    expect(failed.map((f) => [f.key, f.code, f.message, f.attempts])).toEqual(
      refused.map((r, i) => [r.key, codes[i], `refused ${codes[i]}`, 1]),
    );
    expect(failedEvents.map((f) => f.key)).toEqual(refused.map((r) => r.key));
    // The app may put one back (same key) or discard it.
    const again = await publisher.retryFailed(refused[0]!.key);
    expect(again?.seq).toBeGreaterThan(ok.seq);
    await eventually(() => expect(gateway.applied.map((x) => x.key)).toEqual([ok.key, refused[0]!.key]));
    expect(await publisher.discardFailed(refused[1]!.key)).toBe(true);
    expect((await publisher.failed()).map((f) => f.code)).toEqual([102, 440, 443]);
  });

  it('two tabs on one database with the lock: everything sent once, in seq order', async () => {
    const browser = freshBrowser();
    const locks = new FakeLocks();
    const gateway = new FakeGateway();
    gateway.latencyMs = 2;
    const tab1 = new FakeClient(gateway, 'tab-1');
    const tab2 = new FakeClient(gateway, 'tab-2');
    const p1 = await openPublisher(tab1, { ...browser, locks });
    const p2 = await openPublisher(tab2, { ...browser, locks });
    const keys: string[] = [];
    for (let i = 0; i < 10; i++) keys.push((await (i % 2 ? p2 : p1).publish('chat:1', i)).key);
    tab1.connect();
    tab2.connect();
    await Promise.all([p1.flush(), p2.flush(), p1.flush()]);
    for (let i = 10; i < 16; i++) keys.push((await (i % 2 ? p2 : p1).publish('chat:1', i)).key);
    await eventually(async () => expect(await p1.pending()).toEqual([]));
    await Promise.all([p1.flush(), p2.flush()]);
    expect(gateway.keysReceived()).toEqual(keys); // no key sent twice, none out of order
    expect(gateway.applied.map((x) => x.data)).toEqual([...Array(16).keys()]);
    expect(locks.maxHeld).toBe(1);
  });

  it('control: the same two tabs without a lock do double-send (so the test above can fail)', async () => {
    const browser = freshBrowser();
    const gateway = new FakeGateway();
    gateway.latencyMs = 2;
    const tab1 = new FakeClient(gateway, 'tab-1');
    const tab2 = new FakeClient(gateway, 'tab-2');
    const p1 = await openPublisher(tab1, { ...browser, locks: null });
    const p2 = await openPublisher(tab2, { ...browser, locks: null });
    for (let i = 0; i < 5; i++) await p1.publish('chat:1', i);
    tab1.connect();
    tab2.connect();
    await eventually(async () => expect(await p1.pending()).toEqual([]));
    await Promise.all([p1.flush(), p2.flush()]);
    expect(gateway.received.length).toBeGreaterThan(5);
    // the gateway's idempotency still applies each once
    expect(gateway.applied.map((x) => x.data)).toEqual([0, 1, 2, 3, 4]);
  });

  it('20 entries come out in order across disconnects and errors', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    const publisher = await openPublisher(client, freshBrowser());
    const acked: number[] = [];
    publisher.on('acked', (ack) => acked.push(ack.data as number));
    for (let i = 0; i < 7; i++) await publisher.publish('chat:1', i);
    const ok = { ok: true } as const;
    gateway.script.push(ok, ok, { error: { code: 100, message: 'internal' } }, ok, ok, { loseReply: true });
    client.connect();
    for (let i = 7; i < 14; i++) await publisher.publish('chat:1', i);
    await eventually(() => expect(client.state).toBe('disconnected'));
    for (let i = 14; i < 20; i++) await publisher.publish('chat:1', i);
    client.connect();
    await eventually(async () => expect(await publisher.pending()).toEqual([]));
    const order = [...Array(20).keys()];
    expect(acked).toEqual(order);
    expect(gateway.applied.map((x) => x.data)).toEqual(order);
    expect(gateway.applied.map((x) => x.offset)).toEqual(order.map((i) => i + 1));
  });

  it('retries by itself after a temporary error, and on the client connected event', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    const publisher = await openPublisher(client, { ...freshBrowser(), retryDelayMs: 60_000 });
    gateway.script.push({ error: { code: 100, message: 'internal' } });
    await publisher.publish('chat:1', 'x');
    client.connect();
    await eventually(() => expect(gateway.received).toHaveLength(1));
    await sleep(30); // the backoff (>= 30 s here) has not elapsed
    expect(await publisher.pending()).toHaveLength(1);
    client.connect(); // a reconnect flushes at once
    await eventually(async () => expect(await publisher.pending()).toEqual([]));
    expect(gateway.received).toHaveLength(2);
  });

  it('close() stops listening', async () => {
    const gateway = new FakeGateway();
    const client = new FakeClient(gateway);
    const publisher = await openPublisher(client, freshBrowser());
    await publisher.publish('chat:1', 'x');
    expect(client.listenerCount()).toBe(1);
    publisher.close();
    expect(client.listenerCount()).toBe(0);
    client.connect();
    await sleep(20);
    expect(gateway.received).toEqual([]);
    await expect(publisher.publish('chat:1', 'y')).rejects.toThrow(/closed/);
  });
});
