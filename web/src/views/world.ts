/** World: sim-engine's room state (keyframes replace, deltas merge, `gone` removes) drawn on a canvas;
 * the arrow keys move this user's avatar by publishing absolute positions to `sim:<room>.input`. The
 * avatar joins when the view opens (the engine adds an avatar with its user's first input), at a spot of
 * its own derived from the user name, so a reload finds it where it was.
 *
 * `?world=<room>` in the page's address shows another room. A digital twin room (its entities carry
 * `seen`: devices driven by telemetry) gets no avatar; its devices are listed with their last reading and
 * staleness, and a command form sends `{seq, command: {device, payload}}` to the room, whose receipt
 * (mqtt-bridge's delivered / failed / timed out) arrives on `replies:mqtt#<user>`. */

import type { Centrifuge, PublicationContext, Subscription } from 'centrifuge';

import { serviceBanner } from '../services';
import { el, userColor, type AppContext, type View } from './view';

const WORLD = 100;
const STEP = 1.5; // units per key press
/** The engine refuses moves faster than its max_speed (10 units/s, plus one tick of slack). */
const SPEED = 8; // units per second this client allows itself
const SLACK = 0.5;

interface Entity {
  x: number;
  y: number;
  z: number;
  r: number;
  extra: Record<string, unknown>;
}

interface Frame {
  type?: unknown;
  q?: unknown;
  e?: Record<string, unknown>;
  gone?: unknown;
}

/** The engine sends a keyframe every second; a join not seen in two of them is sent again. */
const JOIN_RETRY_MS = 2500;

const clamp = (v: number): number => Math.min(WORLD, Math.max(0, v));

/** Where a user's avatar first appears: spread over the middle of the world, the same for the same name. */
export function spawnPoint(user: string): [number, number] {
  let hash = 2166136261;
  for (const char of user) hash = Math.imul(hash ^ char.codePointAt(0)!, 16777619) >>> 0;
  return [20 + (hash % 6001) / 100, 20 + ((hash >>> 13) % 6001) / 100];
}
const round2 = (v: number): number => Math.round(v * 100) / 100;

/** The command form and receipts of a twin room; made when the first frame shows devices. */
class TwinPanel {
  readonly element: HTMLElement;
  private readonly device = el('select', { testid: 'twin-device' });
  private readonly payload = el('input', { testid: 'twin-payload' });
  private readonly send = el('button', { testid: 'twin-send', text: 'Send command' });
  private readonly receipts = el('ul', { className: 'world-entities', testid: 'twin-receipts' });
  private readonly known = new Set<string>();
  /** Names each command; a new page starts above the last one's (the engine keeps the highest per client). */
  private seq = Date.now();

  constructor(
    private readonly client: Centrifuge,
    private readonly inputChannel: string,
    user: string,
  ) {
    this.payload.value = '{"action": "ping"}';
    this.payload.size = 40;
    this.send.addEventListener('click', () => this.submit());
    this.element = el(
      'div',
      { className: 'twin-panel', testid: 'twin-panel' },
      el('h3', { text: 'Device command' }),
      this.device,
      this.payload,
      this.send,
      this.receipts,
    );
    for (const [channel, handle] of [
      [`replies:mqtt#${user}`, (data: unknown) => this.receipt(data)],
      [`replies:sim#${user}`, (data: unknown) => this.refusal(data)],
    ] as const) {
      const sub = client.getSubscription(channel) ?? client.newSubscription(channel);
      sub.on('publication', (ctx: PublicationContext) => handle(ctx.data));
      sub.subscribe();
    }
  }

  devices(ids: string[]): void {
    for (const id of ids) {
      if (this.known.has(id)) continue;
      this.known.add(id);
      const option = el('option', { text: id });
      option.value = id;
      this.device.append(option);
    }
  }

  private submit(): void {
    let payload: unknown;
    try {
      payload = JSON.parse(this.payload.value);
    } catch {
      this.line('error', 'the payload is not JSON');
      return;
    }
    this.seq += 1;
    const body = { seq: this.seq, command: { device: this.device.value, payload } };
    this.client.publish(this.inputChannel, body).catch((error: unknown) => this.line('error', String(error)));
    this.line('pending', `sent to ${this.device.value}`);
  }

  private receipt(data: unknown): void {
    const { command_id: id, status, reason } = (data ?? {}) as Record<string, unknown>;
    this.line(String(status), `${String(id)}: ${String(status)}${reason ? ` (${String(reason)})` : ''}`);
  }

  private refusal(data: unknown): void {
    const { reason, message } = (data ?? {}) as Record<string, unknown>;
    this.line('refused', `refused: ${String(reason)}: ${String(message)}`);
  }

  private line(state: string, text: string): void {
    const li = el('li', { text });
    li.dataset.state = state;
    this.receipts.prepend(li);
  }
}

export class WorldView implements View {
  private readonly entities = new Map<string, Entity>();
  private readonly canvas = el('canvas', { className: 'world', testid: 'world-canvas' });
  private readonly list = el('ul', { className: 'world-entities', testid: 'world-entities' });
  private readonly info = el('p', { className: 'meta' });
  private readonly sub: Subscription;
  private readonly inputChannel: string;
  private visible = false;
  private drawQueued = false;
  private tick = 0;
  /** Where this user wants the avatar; sent in steps the engine accepts. */
  private target: [number, number] | null = null;
  private sent: { x: number; y: number; at: number } | null = null;
  private sendTimer: number | undefined;
  private joinSentAt = Number.NEGATIVE_INFINITY;
  private twin: TwinPanel | null = null;
  private readonly panel: HTMLElement;
  private readonly hint = el('p', { className: 'hint', text: 'Arrow keys move your avatar.' });

  constructor(
    root: HTMLElement,
    private readonly context: AppContext,
  ) {
    const { config, services, client } = context;
    const room = new URLSearchParams(window.location.search).get('world') || config.world_room;
    this.inputChannel = `sim:${room}.input`;
    this.canvas.width = 600;
    this.canvas.height = 600;
    this.canvas.tabIndex = 0;
    this.panel = el(
      'div',
      { className: 'panel world-panel' },
      el('h2', { text: `World “${room}”` }),
      serviceBanner(services, ['sim-engine'], 'the world does not move.'),
      this.hint,
      this.canvas,
      this.info,
      this.list,
    );
    root.append(this.panel);
    const channel = `sim:${room}`;
    // Fossil deltas (the sim: namespace grants them): one world state differs from the last in a few entities.
    this.sub = client.getSubscription(channel) ?? client.newSubscription(channel, { delta: 'fossil' });
    this.sub.on('publication', (ctx) => this.apply(ctx.data));
    this.sub.on('error', (ctx) => console.warn(`${channel}:`, ctx.error));
    this.sub.subscribe();
    window.addEventListener('keydown', (event) => this.onKey(event));
    this.draw();
  }

  show(): void {
    this.visible = true;
    this.canvas.focus();
    this.draw();
  }

  hide(): void {
    this.visible = false;
  }

  private apply(data: unknown): void {
    if (typeof data !== 'object' || data === null) return; // binary rooms send base64 strings: not shown here
    const frame = data as Frame;
    const q = typeof frame.q === 'number' ? frame.q : 0.01;
    const keyframe = frame.type === 'keyframe';
    if (keyframe) this.entities.clear();
    for (const [id, value] of Object.entries(frame.e ?? {})) {
      if (!Array.isArray(value) || value.length < 4) continue;
      const [x, y, z, r, extra] = value as [number, number, number, number, Record<string, unknown>?];
      this.entities.set(id, { x: x * q, y: y * q, z: z * q, r: r / 100, extra: extra ?? {} });
    }
    if (Array.isArray(frame.gone)) for (const id of frame.gone) this.entities.delete(String(id));
    this.tick = Number((data as { tick?: unknown }).tick) || this.tick;
    if (!this.twin && [...this.entities.values()].some((e) => 'seen' in e.extra)) {
      this.twin = new TwinPanel(this.context.client, this.inputChannel, this.context.user);
      this.hint.textContent = 'A digital twin: devices move and report as their telemetry arrives.';
      this.panel.append(this.twin.element);
    }
    if (this.twin) this.twin.devices([...this.entities.keys()].sort());
    else if (keyframe) this.join();
    this.renderList();
    if (!this.drawQueued && this.visible) {
      this.drawQueued = true;
      requestAnimationFrame(() => {
        this.drawQueued = false;
        this.draw();
      });
    }
  }

  private renderList(): void {
    const items = [...this.entities.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([id, e]) => {
        let text = `${id} (${e.x.toFixed(1)}, ${e.y.toFixed(1)})`;
        if (this.twin) text += ` ${e.extra.stale ? 'stale' : 'live'} ${JSON.stringify(e.extra.v ?? null)}`;
        const li = el('li', { text });
        li.dataset.entity = id;
        if (this.twin) li.dataset.stale = String(Boolean(e.extra.stale));
        li.dataset.x = String(round2(e.x));
        li.dataset.y = String(round2(e.y));
        return li;
      });
    this.list.replaceChildren(...items);
    const noun = this.twin ? 'device' : 'avatar';
    this.info.textContent = `tick ${this.tick} · ${this.entities.size} ${noun}${this.entities.size === 1 ? '' : 's'}`;
  }

  private draw(): void {
    const g = this.canvas.getContext('2d');
    if (!g) return;
    const { width, height } = this.canvas;
    const scale = width / WORLD;
    g.fillStyle = '#0b1220';
    g.fillRect(0, 0, width, height);
    g.strokeStyle = '#1e293b';
    g.lineWidth = 1;
    for (let i = 10; i < WORLD; i += 10) {
      g.beginPath();
      g.moveTo(i * scale, 0);
      g.lineTo(i * scale, height);
      g.moveTo(0, i * scale);
      g.lineTo(width, i * scale);
      g.stroke();
    }
    g.font = '12px system-ui, sans-serif';
    g.textAlign = 'center';
    for (const [id, e] of this.entities) {
      const x = e.x * scale;
      const y = height - e.y * scale; // y grows upwards
      const me = id === this.context.user;
      g.fillStyle = this.twin && e.extra.stale ? '#64748b' : userColor(id);
      g.beginPath();
      g.arc(x, y, me ? 9 : 7, 0, Math.PI * 2);
      g.fill();
      if (me) {
        g.strokeStyle = '#f8fafc';
        g.lineWidth = 2;
        g.stroke();
      }
      g.fillStyle = '#e2e8f0';
      g.fillText(id, x, y - 13);
    }
  }

  /** Puts this user's avatar into the room when a keyframe shows it is not there (first visit, or after
   * the engine removed it as idle) while the world is on screen. */
  private join(): void {
    const user = this.context.user;
    if (!this.visible || this.entities.has(user) || performance.now() - this.joinSentAt < JOIN_RETRY_MS) return;
    this.joinSentAt = performance.now();
    const [x, y] = spawnPoint(user);
    this.target = [round2(x), round2(y)];
    this.sent = { x: this.target[0], y: this.target[1], at: performance.now() };
    this.context.client.publish(this.inputChannel, { p: [this.target[0], this.target[1], 0] }).catch((error: unknown) => {
      console.warn('world join', error);
    });
  }

  // input

  private onKey(event: KeyboardEvent): void {
    if (!this.visible || this.twin) return;
    const target = event.target as HTMLElement | null;
    if (target && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName))) return;
    const moves: Record<string, [number, number]> = {
      ArrowLeft: [-STEP, 0],
      ArrowRight: [STEP, 0],
      ArrowUp: [0, STEP],
      ArrowDown: [0, -STEP],
    };
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    if (!this.target) {
      const mine = this.entities.get(this.context.user);
      this.target = mine ? [mine.x, mine.y] : [20 + Math.random() * 60, 20 + Math.random() * 60];
    }
    this.target = [clamp(this.target[0] + move[0]), clamp(this.target[1] + move[1])];
    this.flush();
  }

  /** Sends the target, or the furthest point towards it the engine's speed limit allows now. */
  private flush(): void {
    window.clearTimeout(this.sendTimer);
    if (!this.target) return;
    const now = performance.now();
    const mine = this.entities.get(this.context.user);
    // Where the engine has the avatar: what was just sent, else the last frame (also after a refused move).
    const from =
      this.sent && (now - this.sent.at < 500 || !mine)
        ? this.sent
        : mine
          ? { x: mine.x, y: mine.y, at: this.sent?.at ?? now - 1000 }
          : null;
    let [x, y] = this.target;
    if (from) {
      const allowed = (SPEED * (now - from.at)) / 1000 + SLACK;
      const distance = Math.hypot(x - from.x, y - from.y);
      if (distance > allowed) {
        x = from.x + ((x - from.x) * allowed) / distance;
        y = from.y + ((y - from.y) * allowed) / distance;
      }
    }
    x = round2(clamp(x));
    y = round2(clamp(y));
    if (!from || Math.hypot(x - from.x, y - from.y) >= 0.01) {
      this.sent = { x, y, at: now };
      this.context.client.publish(this.inputChannel, { p: [x, y, 0] }).catch((error: unknown) => {
        console.warn('world input', error);
      });
    }
    if (Math.hypot(x - this.target[0], y - this.target[1]) >= 0.01) {
      this.sendTimer = window.setTimeout(() => this.flush(), 100);
    }
  }
}
