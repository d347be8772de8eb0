/** The operator console at /console: every session with its connections per gateway (end one), the
 * gateways' numbers, the audit log as a live feed with the chain's verification, a channel inspector and
 * the services' health. Admins only, with a second factor (`acr` >= 2): auth checks it on every call,
 * this page only says so first. Every action here is audited by auth (`auth.console.*`, `auth.revoke`). */

import '../style.css';

import { authBase, loadConfig } from '../config';
import { ServiceStatus } from '../services';
import { Session } from '../session';
import { showLogin } from '../views/login';

const SESSIONS_MS = 2000;
const AUDIT_MS = 1500;
const AUDIT_KEPT = 200;
const MIN_ACR = 2;

const $ = <T extends HTMLElement>(selector: string): T => document.querySelector<T>(selector)!;

interface Connection {
  client: string;
  node: string;
  transport: string;
  ip: string;
  since: number;
  channels: string[];
}

interface SessionRow {
  id: string;
  user: string;
  ip: string;
  user_agent: string;
  device: string;
  acr: string;
  started_at: number;
  last_seen_at: number;
  current: boolean;
  gateways: string[];
  connections: Connection[];
  channels: string[];
}

interface GatewayRow {
  node: string;
  alive: boolean;
  connections: number;
  sessions: number;
  users: number;
}

interface AuditItem {
  seq: number;
  time: string;
  actor: string;
  action: string;
  subject: string;
  outcome: string;
  client_ip: string;
}

/** auth refused: the message it gave, and whether a step-up would help. */
class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly stepUp: boolean,
  ) {
    super(message);
  }
}

class Api {
  constructor(
    private readonly base: string,
    private readonly session: Session,
  ) {}

  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { authorization: `Bearer ${await this.session.token()}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const response = await fetch(this.base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const answer = (await response.json().catch(() => ({}))) as { error?: string; error_description?: string };
    if (!response.ok) {
      const message = answer.error_description ?? `HTTP ${response.status}`;
      throw new ApiError(message, response.status, answer.error === 'insufficient_user_authentication');
    }
    return answer as T;
  }
}

function time(seconds: number): string {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

function cell(row: HTMLTableRowElement, text: string, title = ''): HTMLTableCellElement {
  const td = row.insertCell();
  td.textContent = text;
  if (title) td.title = title;
  return td;
}

class Console {
  private newestSeq = 0;
  private filter = '';

  constructor(private readonly api: Api) {}

  start(): void {
    $('[data-testid="console"]').hidden = false;
    const filter = $<HTMLInputElement>('[data-testid="sessions-filter"]');
    filter.addEventListener('change', () => {
      this.filter = filter.value.trim();
      void this.sessions();
    });
    $('[data-testid="audit-verify-button"]').addEventListener('click', () => void this.verify());
    this.inspector();
    this.every(SESSIONS_MS, () => Promise.all([this.sessions(), this.gateways()]));
    this.every(AUDIT_MS, () => this.audit());
    void this.verify();
  }

  private every(ms: number, work: () => Promise<unknown>): void {
    const run = async (): Promise<void> => {
      try {
        await work();
      } finally {
        window.setTimeout(() => void run(), ms);
      }
    };
    void run();
  }

  private async sessions(): Promise<void> {
    const error = $('[data-testid="sessions-error"]');
    let sessions: SessionRow[];
    try {
      const query = this.filter ? `?user=${encodeURIComponent(this.filter)}` : '';
      sessions = (await this.api.call<{ sessions: SessionRow[] }>('GET', `/v1/sessions${query}`)).sessions;
      error.textContent = '';
    } catch (reason) {
      error.textContent = `Sessions: ${String((reason as Error).message)}`;
      return;
    }
    const body = $<HTMLTableSectionElement>('[data-testid="sessions"]');
    body.replaceChildren();
    for (const session of sessions) {
      const row = body.insertRow();
      row.dataset.testid = 'session-row';
      row.dataset.session = session.id;
      row.dataset.user = session.user;
      cell(row, session.user + (session.current ? ' (this console)' : ''));
      cell(row, session.device, session.user_agent);
      cell(row, session.ip);
      cell(row, session.acr);
      cell(row, time(session.started_at));
      cell(row, time(session.last_seen_at));
      cell(row, session.gateways.join(', '));
      const connections = cell(row, String(session.connections.length));
      connections.dataset.testid = 'session-connections';
      connections.title = session.connections.map((c) => `${c.node} ${c.transport} ${c.ip}`).join('\n');
      cell(row, session.channels.join(', '));
      const end = document.createElement('button');
      end.type = 'button';
      end.textContent = 'End';
      end.dataset.testid = 'end-session';
      end.disabled = session.current;
      end.addEventListener('click', () => void this.end(session, end));
      row.insertCell().append(end);
    }
    $('[data-testid="sessions-count"]').textContent = `(${sessions.length})`;
  }

  private async end(session: SessionRow, button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    const error = $('[data-testid="sessions-error"]');
    try {
      await this.api.call('DELETE', `/v1/sessions/${encodeURIComponent(session.id)}?reason=ended+in+the+console`);
      error.textContent = '';
      await this.sessions();
    } catch (reason) {
      button.disabled = false;
      error.textContent = `Could not end ${session.user}'s session: ${String((reason as Error).message)}`;
    }
  }

  private async gateways(): Promise<void> {
    let gateways: GatewayRow[];
    try {
      gateways = (await this.api.call<{ gateways: GatewayRow[] }>('GET', '/v1/console/gateways')).gateways;
    } catch {
      return; // the sessions' error line says why auth refused
    }
    const body = $<HTMLTableSectionElement>('[data-testid="gateways"]');
    body.replaceChildren();
    for (const gateway of gateways) {
      const row = body.insertRow();
      row.dataset.node = gateway.node;
      cell(row, gateway.node);
      cell(row, gateway.alive ? 'alive' : 'silent').dataset.state = gateway.alive ? 'up' : 'down';
      cell(row, String(gateway.connections));
      cell(row, String(gateway.sessions));
      cell(row, String(gateway.users));
    }
  }

  private async audit(): Promise<void> {
    const error = $('[data-testid="audit-error"]');
    let items: AuditItem[];
    try {
      const path = `/v1/console/audit?limit=50&after=${this.newestSeq}`;
      items = (await this.api.call<{ items: AuditItem[] }>('GET', path)).items;
      error.textContent = '';
    } catch (reason) {
      error.textContent = `Audit log: ${String((reason as Error).message)}`;
      return;
    }
    const feed = $('[data-testid="audit-feed"]');
    // Newest first, as audit-log gives them; prepended oldest first so the newest ends on top.
    for (const item of [...items].reverse()) {
      if (item.seq <= this.newestSeq) continue;
      this.newestSeq = item.seq;
      const entry = document.createElement('li');
      entry.dataset.testid = 'audit-item';
      entry.dataset.action = item.action;
      entry.dataset.outcome = item.outcome;
      entry.dataset.actor = item.actor;
      entry.dataset.subject = item.subject;
      const when = new Date(item.time).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
      entry.textContent = `#${item.seq} ${when} ${item.actor} ${item.action} ${item.subject} → ${item.outcome}`;
      feed.prepend(entry);
    }
    while (feed.children.length > AUDIT_KEPT) feed.lastElementChild?.remove();
  }

  private async verify(): Promise<void> {
    const status = $('[data-testid="audit-verify"]');
    try {
      const report = await this.api.call<{ ok: boolean; rows_checked: number; first_broken: { seq: number; reason: string } | null }>(
        'POST',
        '/v1/console/audit/verify',
      );
      status.dataset.state = report.ok ? 'ok' : 'broken';
      status.textContent = report.ok
        ? `chain: verified (${report.rows_checked} events)`
        : `chain: BROKEN at #${report.first_broken?.seq} (${report.first_broken?.reason})`;
    } catch (reason) {
      status.dataset.state = 'unknown';
      status.textContent = `chain: not verified (${String((reason as Error).message)})`;
    }
  }

  private inspector(): void {
    const form = $<HTMLFormElement>('[data-testid="inspector"]');
    const result = $('[data-testid="inspector-result"]');
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      const method = ((event as SubmitEvent).submitter as HTMLButtonElement | null)?.value ?? 'presence';
      const data = new FormData(form);
      const body: Record<string, unknown> = { channel: String(data.get('channel') ?? '').trim() };
      if (method === 'publish') {
        try {
          body.data = JSON.parse(String(data.get('data') ?? 'null'));
        } catch {
          result.textContent = 'The data to publish is not JSON.';
          return;
        }
      }
      this.api.call('POST', `/v1/console/channels/${method}`, body).then(
        (answer) => (result.textContent = JSON.stringify(answer, null, 2)),
        (reason: unknown) => (result.textContent = `Refused: ${String((reason as Error).message)}`),
      );
    });
  }
}

/** Who may not use the console, in words; with a step-up form for an admin without a second factor. */
function refuse(session: Session, text: string, stepUp: boolean): void {
  $('[data-testid="console-refused"]').hidden = false;
  $('[data-testid="console-refused-text"]').textContent = text;
  const form = $<HTMLFormElement>('[data-testid="step-up-form"]');
  form.hidden = !stepUp;
  form.onsubmit = (event) => {
    event.preventDefault();
    const code = String(new FormData(form).get('otp') ?? '');
    session.stepUp(code).then(
      () => location.reload(),
      (reason: unknown) => ($('[data-testid="console-refused-text"]').textContent = `Step-up refused: ${String((reason as Error).message)}`),
    );
  };
}

async function main(): Promise<void> {
  new ServiceStatus($('ul.services')).start();
  const config = await loadConfig();
  const base = authBase(config);
  const session = new Session(base);
  session.onChange(() => location.reload());
  if (!session.loggedIn) {
    showLogin($('.login'), session);
    return;
  }
  session.schedule();
  const whoami = $('[data-testid="console-whoami"]');
  const claims = session.claims;
  whoami.hidden = false;
  whoami.textContent = `${session.user} (acr ${claims.acr ?? '?'})`;
  const logout = $('[data-testid="logout"]');
  logout.hidden = false;
  logout.addEventListener('click', () => session.logout());
  if (!(claims.roles ?? []).includes('admin')) {
    refuse(session, `The console is for admins: ${session.user} is not one.`, false);
    return;
  }
  if (Number(claims.acr ?? 0) < MIN_ACR) {
    refuse(session, 'The console needs a second factor: enter a code from your authenticator app.', true);
    return;
  }
  new Console(new Api(base, session)).start();
}

void main();
