/** One publication waiting in the outbox (IndexedDB), in `seq` order. */
export interface QueuedPublication {
  /** The idempotency key, generated at publish() time and sent with every attempt. */
  key: string;
  /** Monotonic per database (IndexedDB key generator): survives reloads, never reused. */
  seq: number;
  channel: string;
  data: unknown;
  queuedAt: number;
  /** Send attempts so far (incremented durably before each send). */
  attempts: number;
}

/** A publication the gateway acknowledged with its position in the channel history. */
export interface Ack {
  key: string;
  channel: string;
  data: unknown;
  offset: number;
  epoch: string;
}

/** A publication the gateway refused for good (moved from the outbox to the `failed` store). */
export interface FailedPublication extends QueuedPublication {
  code: number;
  message: string;
}

/** The part of the centrifuge SDK's `Centrifuge` client this package uses (a `Centrifuge` fits). */
export interface CentrifugeLike {
  readonly state: string;
  rpc(method: string, data: unknown): Promise<{ data: unknown }>;
  on(event: 'connected', listener: (ctx: unknown) => void): unknown;
  removeListener(event: 'connected', listener: (ctx: unknown) => void): unknown;
}

/** The part of the Web Locks API used to let one tab flush at a time. */
export interface LockManagerLike {
  request<T>(name: string, callback: (lock: unknown) => Promise<T> | T): Promise<T>;
}
