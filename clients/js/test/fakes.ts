// Test doubles: a fake of the SDK surface the publisher uses (rpc/state/on), a fake gateway behind it that
// applies `$publish` once per idempotency key like the real one, and an exclusive FIFO lock manager.
import 'fake-indexeddb/auto';
import { IDBFactory } from 'fake-indexeddb';
import type { CentrifugeLike, LockManagerLike } from '../src/index.js';

export interface Sent {
  channel: string;
  data: unknown;
  key: string;
  client: string;
}

export interface Applied extends Sent {
  offset: number;
}

type Outcome = { ok: true } | { error: { code: number; message: string; temporary?: boolean } } | { loseReply: true };

/** Behaves like the gateway's `$publish`: same key -> same offset, applied once (no expiry here). */
export class FakeGateway {
  readonly received: Sent[] = [];
  readonly applied: Applied[] = [];
  readonly epoch = 'epoch-1';
  /** Outcomes for the next calls, consumed in order (default: success). */
  readonly script: Outcome[] = [];
  /** Reply latency in ms (0 = next macrotask). */
  latencyMs = 0;
  private readonly byKey = new Map<string, number>();
  private gate: Promise<void> | null = null;
  private openGate: (() => void) | null = null;

  /** Replies wait until release() (requests are still received and applied). */
  hold(): void {
    this.gate = new Promise((resolve) => (this.openGate = resolve));
  }

  release(): void {
    this.openGate?.();
    this.gate = null;
  }

  keysReceived(): string[] {
    return this.received.map((s) => s.key);
  }

  async handle(client: FakeClient, params: { channel: string; data: unknown; idempotency_key: string }): Promise<unknown> {
    this.received.push({ channel: params.channel, data: params.data, key: params.idempotency_key, client: client.name });
    const outcome = this.script.shift();
    if (outcome && 'error' in outcome) {
      await sleep(this.latencyMs);
      throw outcome.error;
    }
    let offset = this.byKey.get(params.idempotency_key);
    if (offset === undefined) {
      offset = this.applied.length + 1;
      this.byKey.set(params.idempotency_key, offset);
      this.applied.push({ channel: params.channel, data: params.data, key: params.idempotency_key, client: client.name, offset });
    }
    if (outcome && 'loseReply' in outcome) {
      // Applied on the server, but the connection drops before the reply arrives.
      await sleep(this.latencyMs);
      client.disconnect();
      throw { code: 3, message: 'client disconnected' };
    }
    await sleep(this.latencyMs);
    if (this.gate) await this.gate;
    if (client.dead) await new Promise(() => {}); // a crashed page never sees its reply
    return { data: { offset, epoch: this.epoch } };
  }
}

/** The three members of `Centrifuge` the publisher touches, with the SDK's state names and error shapes. */
export class FakeClient implements CentrifugeLike {
  state: 'disconnected' | 'connecting' | 'connected' = 'disconnected';
  readonly rpcMethods: string[] = [];
  private readonly connectedListeners = new Set<(ctx: unknown) => void>();

  constructor(
    private readonly gateway: FakeGateway,
    readonly name = 'tab-1',
  ) {}

  async rpc(method: string, data: unknown): Promise<{ data: unknown }> {
    this.rpcMethods.push(method);
    if (this.state !== 'connected') throw { code: 3, message: 'client disconnected' };
    if (method !== '$publish') throw { code: 104, message: 'method not found' };
    return (await this.gateway.handle(this, data as never)) as { data: unknown };
  }

  on(event: 'connected', listener: (ctx: unknown) => void): this {
    if (event === 'connected') this.connectedListeners.add(listener);
    return this;
  }

  removeListener(event: 'connected', listener: (ctx: unknown) => void): this {
    if (event === 'connected') this.connectedListeners.delete(listener);
    return this;
  }

  listenerCount(): number {
    return this.connectedListeners.size;
  }

  connect(): void {
    this.state = 'connected';
    for (const listener of [...this.connectedListeners]) listener({ client: this.name, transport: 'websocket' });
  }

  disconnect(): void {
    this.state = 'disconnected';
  }

  /** The page crashes: replies in flight never arrive. */
  crash(): void {
    this.dead = true;
    this.state = 'disconnected';
  }

  dead = false;
}

/** Web Locks semantics that matter here: exclusive per name, granted in request order. */
export class FakeLocks implements LockManagerLike {
  private readonly tails = new Map<string, Promise<void>>();
  held = 0;
  maxHeld = 0;

  async request<T>(name: string, callback: (lock: unknown) => Promise<T> | T): Promise<T> {
    const previous = this.tails.get(name) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => (release = resolve));
    this.tails.set(name, previous.then(() => mine));
    await previous;
    this.held += 1;
    this.maxHeld = Math.max(this.maxHeld, this.held);
    try {
      return await callback({ name, mode: 'exclusive' });
    } finally {
      this.held -= 1;
      release();
    }
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls until check() passes (or throws its last error after timeoutMs). */
export async function eventually(check: () => unknown | Promise<unknown>, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await check();
      return;
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await sleep(5);
    }
  }
}

let counter = 0;

/** A fresh "browser profile": its own IndexedDB and a unique database name (BroadcastChannel names too). */
export function freshBrowser(): { indexedDB: IDBFactory; dbName: string } {
  counter += 1;
  return { indexedDB: new IDBFactory(), dbName: `test-${process.pid}-${counter}` };
}
