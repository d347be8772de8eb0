import { wrap, type DBSchema, type IDBPDatabase } from 'idb';
import type { FailedPublication, QueuedPublication } from './types.js';

interface OfflineSchema extends DBSchema {
  outbox: { key: number; value: QueuedPublication; indexes: { key: string } };
  failed: { key: number; value: FailedPublication; indexes: { key: string } };
}

const VERSION = 1;

export type NewPublication = Omit<QueuedPublication, 'seq'>;

/** The durable outbox: two object stores, both keyed by `seq`, with a unique index on the idempotency key. */
export class OutboxStore {
  private constructor(private readonly db: IDBPDatabase<OfflineSchema>) {}

  static async open(factory: IDBFactory, name: string): Promise<OutboxStore> {
    const request = factory.open(name, VERSION);
    request.addEventListener('upgradeneeded', () => {
      const db = request.result;
      if (!db.objectStoreNames.contains('outbox')) {
        // autoIncrement: the key generator only grows, even after deletes, so seq keeps increasing across reloads.
        const outbox = db.createObjectStore('outbox', { keyPath: 'seq', autoIncrement: true });
        outbox.createIndex('key', 'key', { unique: true });
      }
      if (!db.objectStoreNames.contains('failed')) {
        const failed = db.createObjectStore('failed', { keyPath: 'seq' });
        failed.createIndex('key', 'key', { unique: true });
      }
    });
    const db = (await wrap(request)) as unknown as IDBPDatabase<OfflineSchema>;
    // Another tab upgrading the schema must not be blocked by this one.
    db.addEventListener('versionchange', () => db.close());
    return new OutboxStore(db);
  }

  /** Stores a new entry; resolves once the transaction is committed (durable). */
  async add(entry: NewPublication): Promise<QueuedPublication> {
    const tx = this.db.transaction('outbox', 'readwrite');
    // The key generator fills in `seq` (keyPath + autoIncrement).
    const seq = await tx.store.add(entry as QueuedPublication);
    await tx.done;
    return { ...entry, seq };
  }

  async first(): Promise<QueuedPublication | undefined> {
    const cursor = await this.db.transaction('outbox').store.openCursor();
    return cursor?.value;
  }

  /** Counts one more attempt durably; undefined when the entry is gone (acked by another tab). */
  async markAttempt(seq: number): Promise<QueuedPublication | undefined> {
    const tx = this.db.transaction('outbox', 'readwrite');
    const entry = await tx.store.get(seq);
    if (entry) {
      entry.attempts += 1;
      await tx.store.put(entry);
    }
    await tx.done;
    return entry;
  }

  async remove(seq: number): Promise<void> {
    await this.db.delete('outbox', seq);
  }

  /** Moves an entry from the outbox to `failed` in one transaction. */
  async fail(entry: QueuedPublication, code: number, message: string): Promise<FailedPublication> {
    const failed: FailedPublication = { ...entry, code, message };
    const tx = this.db.transaction(['outbox', 'failed'], 'readwrite');
    await Promise.all([tx.objectStore('outbox').delete(entry.seq), tx.objectStore('failed').put(failed), tx.done]);
    return failed;
  }

  /** Moves a failed entry back to the end of the outbox (new seq, same idempotency key). */
  async requeue(key: string): Promise<QueuedPublication | undefined> {
    const tx = this.db.transaction(['outbox', 'failed'], 'readwrite');
    const failedStore = tx.objectStore('failed');
    const failed = await failedStore.index('key').get(key);
    if (!failed) {
      await tx.done;
      return undefined;
    }
    const { code: _code, message: _message, seq: oldSeq, ...rest } = failed;
    const entry: NewPublication = { ...rest, attempts: 0 };
    await failedStore.delete(oldSeq);
    const seq = await tx.objectStore('outbox').add(entry as QueuedPublication);
    await tx.done;
    return { ...entry, seq };
  }

  async discardFailed(key: string): Promise<boolean> {
    const tx = this.db.transaction('failed', 'readwrite');
    const seq = await tx.store.index('key').getKey(key);
    if (seq !== undefined) await tx.store.delete(seq);
    await tx.done;
    return seq !== undefined;
  }

  pending(): Promise<QueuedPublication[]> {
    return this.db.getAll('outbox');
  }

  failed(): Promise<FailedPublication[]> {
    return this.db.getAll('failed');
  }

  close(): void {
    this.db.close();
  }
}
