/** Which backend services run (`GET /web/services`, polled), so each view can say "X is not running"
 * or, when X runs without one of its dependencies, which one it waits for. */

/** up: ready; down: does not answer; waiting: runs, but a dependency (`missing`) is not reachable. */
export type ServiceState = 'up' | 'down' | 'waiting';
export interface ServiceStatusEntry {
  state: ServiceState;
  missing?: Record<string, string>;
}
export type ServiceMap = Record<string, ServiceStatusEntry>;

/** What a service's dependencies are, in words for the banner. */
const DEPENDENCY_NAMES: Record<string, string> = {
  bus: 'the event bus (Kafka)',
  broker: 'the channel broker (Redis)',
  mqtt: 'the MQTT broker',
};

const POLL_MS = 5000;
const NAMES = ['auth', 'collab', 'stream-ingest', 'mqtt-bridge', 'sim-engine'];

export class ServiceStatus {
  private state: ServiceMap = {};
  private readonly listeners = new Set<(state: ServiceMap) => void>();
  private timer: number | undefined;

  constructor(private readonly list: HTMLElement) {
    for (const name of NAMES) this.item(name);
  }

  start(): void {
    void this.poll();
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') void this.poll();
    });
    window.addEventListener('online', () => void this.poll());
  }

  /** 'up', 'down', 'waiting', or undefined while unknown (before the first answer). */
  get(name: string): ServiceState | undefined {
    return this.state[name]?.state;
  }

  /** Called now with the current state (if known) and after every change. */
  watch(listener: (state: ServiceMap) => void): () => void {
    this.listeners.add(listener);
    if (Object.keys(this.state).length) listener(this.state);
    return () => this.listeners.delete(listener);
  }

  private async poll(): Promise<void> {
    window.clearTimeout(this.timer);
    try {
      const response = await fetch('/web/services', { cache: 'no-store' });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const next = (await response.json()) as ServiceMap;
      this.list.classList.remove('stale');
      const changed = JSON.stringify(next) !== JSON.stringify(this.state);
      this.state = next;
      for (const [name, value] of Object.entries(next)) {
        const item = this.item(name);
        item.querySelector('.value')!.textContent = value.state;
        item.dataset.state = value.state;
        item.title = value.missing ? `waiting for ${describeMissing(value.missing)}` : '';
      }
      if (changed) for (const listener of this.listeners) listener(this.state);
    } catch {
      // The gateway itself is unreachable (offline): keep the last answer, marked as old.
      this.list.classList.add('stale');
    } finally {
      this.timer = window.setTimeout(() => void this.poll(), POLL_MS);
    }
  }

  private item(name: string): HTMLElement {
    let item = this.list.querySelector<HTMLElement>(`li[data-service="${CSS.escape(name)}"]`);
    if (!item) {
      item = document.createElement('li');
      item.dataset.service = name;
      item.dataset.state = 'unknown';
      const label = document.createElement('span');
      label.className = 'name';
      label.textContent = name;
      const value = document.createElement('span');
      value.className = 'value';
      value.dataset.testid = `service-status-${name}`;
      value.textContent = '?';
      item.append(label, value);
      this.list.append(item);
    }
    return item;
  }
}

function describeMissing(missing: Record<string, string>): string {
  return Object.entries(missing)
    .map(([name, reason]) => `${DEPENDENCY_NAMES[name] ?? name} (${reason})`)
    .join('; ');
}

/** A banner that says "<service> is not running", or what a running service is missing, while it is so. */
export function serviceBanner(services: ServiceStatus, names: string[], what: string): HTMLElement {
  const banner = document.createElement('p');
  banner.className = 'banner down';
  banner.hidden = true;
  banner.dataset.testid = `banner-${names.join('-')}`;
  services.watch((state) => {
    const down = names.filter((name) => state[name]?.state === 'down');
    const waiting = names.filter((name) => state[name]?.state === 'waiting');
    const lines = [];
    if (down.length) lines.push(`${down.join(' and ')} ${down.length > 1 ? 'are' : 'is'} not running: ${what}`);
    for (const name of waiting) {
      lines.push(`${name} runs but cannot reach ${describeMissing(state[name].missing ?? {})}: ${what}`);
    }
    banner.hidden = lines.length === 0;
    banner.textContent = lines.join(' ');
  });
  return banner;
}
