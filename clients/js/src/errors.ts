/** How a failed `$publish` is handled: kept and retried later, or moved to the `failed` store. */
export type ErrorKind = 'temporary' | 'permanent';

/** The error shape the centrifuge SDK rejects with (`{code, message, temporary?}`). */
export interface PublishError {
  code: number;
  message: string;
  temporary?: boolean;
}

/** Server errors that can never succeed by resending the same publication. */
export const PERMANENT_CODES: ReadonlySet<number> = new Set([
  102, // unknown channel
  103, // permission denied
  107, // bad request
  440, // signature errors
  441,
  442,
  443,
]);

/** Server errors that are worth a retry: internal (100), token expired (109), too many requests (111). */
export const TEMPORARY_CODES: ReadonlySet<number> = new Set([100, 109, 111]);

/** Normalizes whatever the SDK (or the environment) threw into `{code, message}`; code 0 = not from the server. */
export function toPublishError(err: unknown): PublishError {
  if (typeof err === 'object' && err !== null && typeof (err as { code?: unknown }).code === 'number') {
    const e = err as { code: number; message?: unknown; temporary?: unknown };
    return {
      code: e.code,
      message: typeof e.message === 'string' ? e.message : '',
      ...(e.temporary === true ? { temporary: true } : {}),
    };
  }
  return { code: 0, message: err instanceof Error ? err.message : String(err) };
}

/**
 * The default classification. Known permanent codes first; then what the SDK itself treats as
 * temporary (transport/timeout codes < 100, the `temporary` flag, 100, 109, 111); any other server
 * code (>= 100) is permanent, so one poisonous entry cannot block the queue forever. Permanent
 * failures are moved to the `failed` store, never dropped.
 */
export function classifyError(err: PublishError): ErrorKind {
  if (PERMANENT_CODES.has(err.code)) return 'permanent';
  if (err.code < 100 || err.temporary === true || TEMPORARY_CODES.has(err.code)) return 'temporary';
  return 'permanent';
}
