/** Login session: tokens from auth, kept in localStorage and refreshed before they expire.
 *
 * Refresh tokens rotate (each refresh returns a new one and retires the old), so tabs refresh one at a
 * time (Web Locks) and adopt a newer session another tab stored instead of spending a retired token. */

const STORAGE_KEY = 'tsunagu.session';
const LOCK_NAME = 'tsunagu.session.refresh';
/** Refresh once this share of the access token's life has passed. */
const REFRESH_AT = 0.75;
const RETRY_MS = 5000;

export interface StoredSession {
  user: string;
  access_token: string;
  refresh_token: string;
  issued_at: number; // ms since the epoch
  expires_at: number; // ms since the epoch
}

interface TokenResponse {
  access_token: string;
  refresh_token: string;
  expires_in: number;
}

/** auth refused the credentials or the refresh token: the user must log in again. */
export class SessionExpired extends Error {}

/** A network error or an auth outage: try again later, keep the session. */
export class AuthUnavailable extends Error {}

/** The password was right and the user has a second factor: send it with `mfaToken` (Session.completeMfa). */
export class MfaRequired extends Error {
  constructor(
    message: string,
    readonly mfaToken: string,
    readonly factors: string[],
  ) {
    super(message);
  }
}

/** What the access token says about its user: roles, how strongly the session is authenticated, its id. */
export interface Claims {
  sub?: string;
  sid?: string;
  acr?: string;
  amr?: string[];
  roles?: string[];
}

/** auth refuses logins for this user (or from here) after too many failures, for `retryAfter` seconds. */
export class LoginLocked extends AuthUnavailable {
  readonly until: number; // ms since the epoch

  constructor(
    message: string,
    readonly retryAfter: number,
  ) {
    super(message);
    this.until = Date.now() + retryAfter * 1000;
  }
}

/** Retry-After in seconds (delta-seconds or an HTTP date); null when absent or unreadable. */
function retryAfterSeconds(header: string | null): number | null {
  if (!header) return null;
  if (/^\d+$/.test(header.trim())) return Number(header.trim());
  const at = Date.parse(header);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

function readStored(): StoredSession | null {
  const raw = localStorage.getItem(STORAGE_KEY);
  if (!raw) return null;
  try {
    const value = JSON.parse(raw) as StoredSession;
    return value.access_token && value.refresh_token ? value : null;
  } catch {
    return null;
  }
}

/** The access token's claims (not verified: the servers do that; the app only reads them). */
export function claimsOf(token: string): Claims {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload)) as Claims;
  } catch {
    return {};
  }
}

function subject(token: string, fallback: string): string {
  const sub = claimsOf(token).sub;
  return typeof sub === 'string' && sub ? sub : fallback;
}

async function post(url: string, body: unknown, bearer?: string): Promise<TokenResponse> {
  let response: Response;
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (bearer) headers.authorization = `Bearer ${bearer}`;
  try {
    response = await fetch(url, { method: 'POST', headers, body: JSON.stringify(body) });
  } catch (error) {
    throw new AuthUnavailable(`auth is not reachable (${String(error)})`);
  }
  if (response.ok) return (await response.json()) as TokenResponse;
  let message = `HTTP ${response.status}`;
  let detail: { error?: string; error_description?: string; message?: string; detail?: unknown; mfa_token?: string; factors?: string[] } = {};
  try {
    detail = (await response.json()) as typeof detail;
    message = detail.error_description ?? detail.message ?? (typeof detail.detail === 'string' ? detail.detail : message);
  } catch {
    // not JSON: keep the status
  }
  if (response.status === 403 && detail.error === 'mfa_required' && detail.mfa_token) {
    throw new MfaRequired(message, detail.mfa_token, detail.factors ?? []);
  }
  if (response.status === 400 || response.status === 401 || response.status === 403) throw new SessionExpired(message);
  if (response.status === 429) {
    const wait = retryAfterSeconds(response.headers.get('retry-after'));
    if (wait !== null) throw new LoginLocked(message, wait);
  }
  throw new AuthUnavailable(message);
}

function withLock<T>(work: () => Promise<T>): Promise<T> {
  if ('locks' in navigator && navigator.locks) return navigator.locks.request(LOCK_NAME, work) as Promise<T>;
  return work();
}

export class Session {
  private current: StoredSession | null = readStored();
  private refreshing: Promise<string> | null = null;
  private timer: number | undefined;
  private readonly listeners = new Set<(session: StoredSession | null) => void>();

  constructor(private readonly authUrl: string) {
    // Another tab logged out, logged in or refreshed.
    window.addEventListener('storage', (event) => {
      if (event.key !== STORAGE_KEY) return;
      const next = readStored();
      const changedUser = next?.user !== this.current?.user;
      this.current = next;
      if (changedUser) this.emit();
      else this.schedule();
    });
    window.addEventListener('online', () => this.schedule());
  }

  get user(): string | null {
    return this.current?.user ?? null;
  }

  get accessToken(): string | null {
    return this.current?.access_token ?? null;
  }

  get loggedIn(): boolean {
    return this.current !== null;
  }

  /** Called with the new session on login, null on logout (also from another tab). */
  onChange(listener: (session: StoredSession | null) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async login(username: string, password: string): Promise<void> {
    const tokens = await post(`${this.authUrl}/v1/token`, { grant_type: 'password', username, password });
    this.store(tokens, username);
    this.emit();
  }

  /** The second step of a login: a TOTP code, or a recovery code (it has dashes: XXXX-XXXX-XXXX-XXXX). */
  async completeMfa(username: string, mfaToken: string, code: string): Promise<void> {
    const trimmed = code.trim();
    const body = trimmed.includes('-')
      ? { grant_type: 'mfa_recovery_code', mfa_token: mfaToken, recovery_code: trimmed }
      : { grant_type: 'mfa_otp', mfa_token: mfaToken, otp: trimmed.replace(/\s/g, '') };
    const tokens = await post(`${this.authUrl}/v1/token`, body);
    this.store(tokens, username);
    this.emit();
  }

  /** Step-up: a TOTP code raises this session's level; the new access token replaces the current one. */
  async stepUp(code: string): Promise<void> {
    const current = this.current;
    if (!current) throw new SessionExpired('not logged in');
    const tokens = await post(`${this.authUrl}/v1/step-up`, { otp: code.trim() }, current.access_token);
    this.store({ ...tokens, refresh_token: current.refresh_token }, current.user);
    this.emit();
  }

  get claims(): Claims {
    return this.current ? claimsOf(this.current.access_token) : {};
  }

  logout(): void {
    window.clearTimeout(this.timer);
    this.current = null;
    localStorage.removeItem(STORAGE_KEY);
    this.emit();
  }

  /** A valid access token, refreshed first when it is (nearly) expired; what the SDKs' getToken use. */
  async token(): Promise<string> {
    const now = Date.now();
    if (!this.current) throw new SessionExpired('not logged in');
    if (now < this.refreshAfter(this.current)) return this.current.access_token;
    return this.refresh();
  }

  /** Exchanges the refresh token for new tokens; one refresh at a time, across tabs. */
  refresh(): Promise<string> {
    if (!this.refreshing) {
      this.refreshing = withLock(async () => {
        const stored = readStored();
        if (!stored || stored.user !== this.current?.user) throw new SessionExpired('logged out');
        // Another tab refreshed while this one waited for the lock.
        if (stored.refresh_token !== this.current?.refresh_token && Date.now() < this.refreshAfter(stored)) {
          this.current = stored;
          return stored.access_token;
        }
        const tokens = await post(`${this.authUrl}/v1/refresh`, { refresh_token: stored.refresh_token });
        this.store(tokens, stored.user);
        return tokens.access_token;
      })
        .catch((error: unknown) => {
          if (error instanceof SessionExpired) this.logout();
          throw error;
        })
        .finally(() => {
          this.refreshing = null;
          this.schedule();
        });
    }
    return this.refreshing;
  }

  /** Keeps the access token fresh in the background: refresh at 75% of its life, waiting while offline. */
  schedule(): void {
    window.clearTimeout(this.timer);
    const session = this.current;
    if (!session || this.refreshing) return;
    const delay = Math.max(0, this.refreshAfter(session) - Date.now());
    this.timer = window.setTimeout(() => {
      if (!navigator.onLine) return; // the 'online' event schedules again
      this.refresh().catch((error: unknown) => {
        if (error instanceof AuthUnavailable) this.timer = window.setTimeout(() => this.schedule(), RETRY_MS);
      });
    }, Math.min(delay, 2 ** 31 - 1));
  }

  private refreshAfter(session: StoredSession): number {
    return session.issued_at + (session.expires_at - session.issued_at) * REFRESH_AT;
  }

  private store(tokens: TokenResponse, username: string): void {
    const now = Date.now();
    this.current = {
      user: subject(tokens.access_token, username),
      access_token: tokens.access_token,
      refresh_token: tokens.refresh_token,
      issued_at: now,
      expires_at: now + tokens.expires_in * 1000,
    };
    localStorage.setItem(STORAGE_KEY, JSON.stringify(this.current));
    this.schedule();
  }

  private emit(): void {
    for (const listener of this.listeners) listener(this.current);
  }
}
