/** Which backend services run (`GET /web/services`, polled), so each view can say "X is not running". */

export type ServiceState = 'up' | 'down';
export type ServiceMap = Record<string, ServiceState>;

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

  /** 'up', 'down', or undefined while unknown (before the first answer). */
  get(name: string): ServiceState | undefined {
    return this.state[name];
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
        item.querySelector('.value')!.textContent = value;
        item.dataset.state = value;
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

/** A banner element that says "<service> is not running" while the service is down. */
export function serviceBanner(services: ServiceStatus, names: string[], what: string): HTMLElement {
  const banner = document.createElement('p');
  banner.className = 'banner down';
  banner.hidden = true;
  services.watch((state) => {
    const down = names.filter((name) => state[name] === 'down');
    banner.hidden = down.length === 0;
    banner.textContent = down.length
      ? `${down.join(' and ')} ${down.length > 1 ? 'are' : 'is'} not running: ${what}`
      : '';
  });
  return banner;
}
