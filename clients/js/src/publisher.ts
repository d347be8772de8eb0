import { classifyError, toPublishError, type ErrorKind, type PublishError } from './errors.js';
import { OutboxStore } from './store.js';
import type { Ack, CentrifugeLike, FailedPublication, LockManagerLike, QueuedPublication } from './types.js';

/** The gateway's RPC method that publishes and returns `{offset, epoch}` (stock publish() drops the result). */
export const PUBLISH_RPC = '$publish';

export interface OfflinePublisherOptions {
  /** IndexedDB database name; tabs of one origin using the same name share one queue. Default 'tsunagu-offline'. */
  dbName?: string;
  /** Web Locks name serializing flushes across tabs. Default `${dbName}:flush`. */
  lockName?: string;
  /** Backoff base after a temporary error (doubles per failure, with jitter). Default 1000. */
  retryDelayMs?: number;
  /** Backoff cap. Default 30000. */
  maxRetryDelayMs?: number;
  /** IndexedDB factory (tests pass fake-indexeddb's). Default `globalThis.indexedDB`. */
  indexedDB?: IDBFactory;
  /** Clock for `queuedAt`. Default Date.now. */
  now?: () => number;
  /** Lock manager; default `navigator.locks` when available, `null` = no cross-tab lock. */
  locks?: LockManagerLike | null;
  /** Tell other tabs about queue changes through a BroadcastChannel (when available). Default true. */
  broadcast?: boolean;
  /** Overrides the temporary/permanent decision for an error. */
  classifyError?: (error: PublishError) => ErrorKind;
}

/** Why the queue changed. 'remote' = another tab (same dbName) changed it. */
export interface ChangeEvent {
  reason: 'queued' | 'acked' | 'failed' | 'requeued' | 'discarded' | 'remote';
}

/** A temporary failure: the entry stays first in the queue and the flush is retried after `delayMs`. */
export interface RetryEvent {
  entry: QueuedPublication;
  error: PublishError;
  delayMs: number;
}

export interface OfflinePublisherEvents {
  queued: QueuedPublication;
  acked: Ack;
  failed: FailedPublication;
  change: ChangeEvent;
  retry: RetryEvent;
  /** Unexpected errors (e.g. IndexedDB failing); the flush is retried with backoff. */
  error: unknown;
}

export type OfflinePublisherEvent = keyof OfflinePublisherEvents;

type Listener = (x: any) => void;

interface BroadcastMessage {
  type: 'queued' | 'change';
}

function randomKey(): string {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === 'function') return c.randomUUID();
  // randomUUID only exists in secure contexts; build the same v4 UUID from getRandomValues otherwise.
  const b = c.getRandomValues(new Uint8Array(16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function parseAck(reply: unknown): { offset: number; epoch: string } | undefined {
  const data = (reply as { data?: unknown } | null | undefined)?.data as { offset?: unknown; epoch?: unknown } | undefined;
  if (typeof data !== 'object' || data === null || typeof data.offset !== 'number') return undefined;
  return { offset: data.offset, epoch: typeof data.epoch === 'string' ? data.epoch : '' };
}

/**
 * An offline-first outbox on top of the stock centrifuge SDK. publish() stores the entry durably in
 * IndexedDB with an idempotency key; entries are sent one at a time in `seq` order through the gateway's
 * `$publish` RPC and removed only once acknowledged with an offset.
 */
export class OfflinePublisher {
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly dbName: string;
  private readonly lockName: string;
  private readonly retryDelayMs: number;
  private readonly maxRetryDelayMs: number;
  private readonly now: () => number;
  private readonly locks: LockManagerLike | null;
  private readonly classify: (error: PublishError) => ErrorKind;
  private readonly channel: BroadcastChannel | null;
  private running: Promise<void> | null = null;
  private again = false;
  private closed = false;
  private failures = 0;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly onConnected = (): void => {
    // A new connection is a fresh start: no backoff left over from the old one.
    this.failures = 0;
    void this.flush();
  };
  private readonly onOnline = (): void => {
    void this.flush();
  };

  private constructor(
    private readonly client: CentrifugeLike,
    private readonly store: OutboxStore,
    options: OfflinePublisherOptions,
  ) {
    this.dbName = options.dbName ?? 'tsunagu-offline';
    this.lockName = options.lockName ?? `${this.dbName}:flush`;
    this.retryDelayMs = options.retryDelayMs ?? 1000;
    this.maxRetryDelayMs = options.maxRetryDelayMs ?? 30_000;
    this.now = options.now ?? Date.now;
    this.classify = options.classifyError ?? classifyError;
    const nav = (globalThis as { navigator?: { locks?: LockManagerLike } }).navigator;
    this.locks = options.locks === undefined ? (nav?.locks ?? null) : options.locks;
    this.channel =
      options.broadcast !== false && typeof BroadcastChannel === 'function'
        ? new BroadcastChannel(`tsunagu-offline:${this.dbName}`)
        : null;
    this.channel?.addEventListener('message', (event: MessageEvent<BroadcastMessage>) => {
      if (this.closed) return;
      this.emit('change', { reason: 'remote' });
      // Another tab queued something: whichever tab is connected sends it.
      if (event.data?.type === 'queued') void this.flush();
    });
  }

  /** Opens (or creates) the queue, starts listening to the client and flushes what a previous page left. */
  static async open(client: CentrifugeLike, options: OfflinePublisherOptions = {}): Promise<OfflinePublisher> {
    const factory = options.indexedDB ?? globalThis.indexedDB;
    if (!factory) throw new Error('OfflinePublisher needs IndexedDB (pass options.indexedDB outside browsers)');
    const store = await OutboxStore.open(factory, options.dbName ?? 'tsunagu-offline');
    const publisher = new OfflinePublisher(client, store, options);
    client.on('connected', publisher.onConnected);
    const win = (globalThis as { window?: { addEventListener?: (t: string, f: () => void) => void } }).window;
    win?.addEventListener?.('online', publisher.onOnline);
    void publisher.flush();
    return publisher;
  }

  /** Stores the publication durably (resolves after the IndexedDB commit), then sends it when connected. */
  async publish(channel: string, data: unknown): Promise<QueuedPublication> {
    if (this.closed) throw new Error('OfflinePublisher is closed');
    if (typeof channel !== 'string' || channel === '') throw new TypeError('channel must be a non-empty string');
    const json = JSON.stringify(data); // throws on cycles / BigInt
    if (json === undefined) throw new TypeError('data must be JSON-serializable');
    // Store exactly what goes over the wire (Dates become strings, undefined fields vanish, ...).
    const entry = await this.store.add({
      key: randomKey(),
      channel,
      data: JSON.parse(json) as unknown,
      queuedAt: this.now(),
      attempts: 0,
    });
    this.emit('queued', entry);
    this.changed('queued');
    if (this.client.state === 'connected') void this.flush();
    return entry;
  }

  /** Entries not yet acknowledged, in send order. */
  pending(): Promise<QueuedPublication[]> {
    return this.store.pending();
  }

  /** Entries the gateway refused for good. */
  failed(): Promise<FailedPublication[]> {
    return this.store.failed();
  }

  /** Puts a failed entry back at the end of the queue (same idempotency key). */
  async retryFailed(key: string): Promise<QueuedPublication | undefined> {
    const entry = await this.store.requeue(key);
    if (entry) {
      this.changed('requeued');
      if (this.client.state === 'connected') void this.flush();
    }
    return entry;
  }

  /** Deletes a failed entry (the app's explicit decision). */
  async discardFailed(key: string): Promise<boolean> {
    const removed = await this.store.discardFailed(key);
    if (removed) this.changed('discarded');
    return removed;
  }

  /**
   * Sends everything pending, in order, one at a time; resolves when the queue is empty, a temporary
   * error stopped it (a retry is scheduled) or the client is not connected (no-op). Never rejects.
   */
  flush(): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (this.running) {
      this.again = true;
      return this.running;
    }
    const run = async (): Promise<void> => {
      await Promise.resolve(); // so `this.running` is set before the finally below clears it
      try {
        do {
          this.again = false;
          if (this.client.state !== 'connected') return;
          await this.withLock(() => this.drain());
        } while (this.again && !this.closed);
      } catch (error) {
        this.emit('error', error);
        this.scheduleRetry();
      } finally {
        this.running = null;
      }
    };
    this.running = run();
    return this.running;
  }

  on<E extends OfflinePublisherEvent>(event: E, listener: (x: OfflinePublisherEvents[E]) => void): () => void;
  on(event: 'queued' | 'acked' | 'failed' | 'change', listener: (x: any) => void): () => void;
  on(event: string, listener: Listener): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
    };
  }

  /** Stops listening and sending; the database closes once a send in progress has been recorded. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.client.removeListener('connected', this.onConnected);
    const win = (globalThis as { window?: { removeEventListener?: (t: string, f: () => void) => void } }).window;
    win?.removeEventListener?.('online', this.onOnline);
    this.channel?.close();
    this.listeners.clear();
    void (this.running ?? Promise.resolve()).finally(() => this.store.close());
  }

  private async withLock(fn: () => Promise<void>): Promise<void> {
    if (!this.locks) return fn();
    // Exclusive: another tab's flush finishes first, then this one reads the (shorter) queue afresh.
    await this.locks.request(this.lockName, () => fn());
  }

  private async drain(): Promise<void> {
    if (this.retryTimer) {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
    }
    while (!this.closed && this.client.state === 'connected') {
      const head = await this.store.first();
      if (!head) return;
      const entry = await this.store.markAttempt(head.seq);
      if (!entry) continue; // acked meanwhile by a tab without the lock
      let reply: unknown;
      try {
        reply = await this.client.rpc(PUBLISH_RPC, {
          channel: entry.channel,
          data: entry.data,
          idempotency_key: entry.key,
        });
      } catch (thrown) {
        const error = toPublishError(thrown);
        if (this.classify(error) === 'permanent') {
          const failed = await this.store.fail(entry, error.code, error.message);
          this.emit('failed', failed);
          this.changed('failed');
          continue;
        }
        this.retryLater(entry, error);
        return;
      }
      const ack = parseAck(reply);
      if (!ack) {
        // Resending is safe (same idempotency key), dropping is not.
        this.retryLater(entry, { code: 0, message: 'malformed $publish reply: no numeric offset' });
        return;
      }
      await this.store.remove(entry.seq);
      this.failures = 0;
      this.emit('acked', { key: entry.key, channel: entry.channel, data: entry.data, ...ack });
      this.changed('acked');
    }
  }

  private retryLater(entry: QueuedPublication, error: PublishError): void {
    const delayMs = this.scheduleRetry();
    this.emit('retry', { entry, error, delayMs });
  }

  private scheduleRetry(): number {
    const base = Math.min(this.maxRetryDelayMs, this.retryDelayMs * 2 ** Math.min(this.failures, 30));
    this.failures += 1;
    const delayMs = Math.round(base * (0.5 + Math.random() * 0.5));
    if (this.closed) return delayMs;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      void this.flush();
    }, delayMs);
    return delayMs;
  }

  private changed(reason: ChangeEvent['reason']): void {
    this.emit('change', { reason });
    try {
      this.channel?.postMessage({ type: reason === 'queued' ? 'queued' : 'change' } satisfies BroadcastMessage);
    } catch {
      // a closed channel: nothing to tell
    }
  }

  private emit(event: string, value: unknown): void {
    for (const listener of [...(this.listeners.get(event) ?? [])]) {
      try {
        listener(value);
      } catch (error) {
        console.error(`OfflinePublisher '${event}' listener failed`, error);
      }
    }
  }
}
