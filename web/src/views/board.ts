/** Board: live tickers (last price and a sparkline per symbol), the latest IoT telemetry, and a device
 * to command: its state from its `mqtt:` channel, and a setpoint sent as an MQTT 5 request
 * (`mqtt.request` through the gateway to mqtt-bridge), whose answer is the device's own. */

import type { Centrifuge, PublicationContext, Subscription } from 'centrifuge';

import { serviceBanner } from '../services';
import { el, type AppContext, type View } from './view';

const SPARK_POINTS = 60;
const IOT_KEEP = 20;
/** Seconds mqtt-bridge waits for the device's answer. */
const DEVICE_TIMEOUT = 5;

interface DeviceState {
  ts?: unknown;
  temperature?: unknown;
  setpoint?: unknown;
  heating?: unknown;
}

interface DeviceAnswer extends DeviceState {
  ok?: unknown;
  error?: unknown;
}

const degrees = (value: unknown): string => (typeof value === 'number' ? `${value.toFixed(1)} °C` : '–');

/** The device's state as the panel shows it. */
function describeState(state: DeviceState): string {
  const heating = state.heating === true ? ' · heating' : state.heating === false ? ' · idle' : '';
  return `room ${degrees(state.temperature)} · setpoint ${degrees(state.setpoint)}${heating}`;
}

class DevicePanel {
  readonly element: HTMLElement;
  private readonly state = el('p', { className: 'device-state', testid: 'device-state', text: 'no state yet' });
  private readonly answer = el('p', { className: 'device-answer', testid: 'device-answer' });
  private readonly setpoint = el('input', { testid: 'device-setpoint' });
  private readonly send = el('button', { testid: 'device-send', text: 'Set' });

  constructor(
    private readonly client: Centrifuge,
    private readonly device: NonNullable<AppContext['config']['device']>,
  ) {
    this.setpoint.type = 'number';
    this.setpoint.min = '5';
    this.setpoint.max = '35';
    this.setpoint.step = '0.5';
    this.setpoint.value = '22';
    this.send.type = 'button';
    this.send.addEventListener('click', () => void this.command());
    this.setpoint.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') void this.command();
    });
    const form = el('div', { className: 'device-form' }, el('label', {}, 'Setpoint °C ', this.setpoint), this.send);
    this.element = el(
      'div',
      { className: 'device', testid: 'device' },
      el('h3', { text: device.name }),
      this.state,
      form,
      this.answer,
    );
  }

  private shownAt = 0;

  /** Shows a state (a reading, the state channel, an answer) unless a newer one is shown already. */
  showState(data: unknown): void {
    if (typeof data !== 'object' || data === null) return;
    const state = data as DeviceState;
    const at = typeof state.ts === 'number' ? state.ts : 0;
    if (at && at < this.shownAt) return; // history arriving after live news
    this.shownAt = Math.max(this.shownAt, at);
    this.state.textContent = describeState(state);
  }

  /** Sends `{setpoint}` to the device's command topic and shows what the device answered. */
  private async command(): Promise<void> {
    const setpoint = Number(this.setpoint.value);
    if (!Number.isFinite(setpoint)) {
      this.show('failed', 'Enter a number.');
      return;
    }
    this.send.disabled = true;
    this.show('pending', `asking ${this.device.name}…`);
    const started = performance.now();
    try {
      const result = await this.client.rpc('mqtt.request', {
        topic: this.device.command_topic,
        payload: { setpoint },
        timeout: DEVICE_TIMEOUT,
      });
      const reply = (result.data as { payload?: unknown }).payload;
      const took = Math.round(performance.now() - started);
      const answer = (typeof reply === 'object' && reply !== null ? reply : {}) as DeviceAnswer;
      if (answer.ok === true) {
        this.show('ok', `${this.device.name} answered in ${took} ms: ${describeState(answer)}`);
        this.showState(answer);
      } else {
        const why = typeof answer.error === 'string' ? answer.error : JSON.stringify(reply);
        this.show('failed', `${this.device.name} refused: ${why}`);
      }
    } catch (error) {
      const message = (error as { message?: unknown }).message;
      this.show(
        'failed',
        `no answer from ${this.device.command_topic}: ${typeof message === 'string' ? message : String(error)}` +
          ' (is the device connected?)',
      );
    } finally {
      this.send.disabled = false;
    }
  }

  private show(state: 'pending' | 'ok' | 'failed', text: string): void {
    this.answer.dataset.state = state;
    this.answer.textContent = text;
  }
}

interface Tick {
  offset: number;
  price: number;
}

class Ticker {
  readonly element: HTMLElement;
  private readonly price: HTMLElement;
  private readonly change: HTMLElement;
  private readonly canvas: HTMLCanvasElement;
  private ticks: Tick[] = [];

  constructor(readonly symbol: string) {
    this.price = el('span', { className: 'price', testid: `board-price-${symbol}`, text: '–' });
    this.change = el('span', { className: 'change' });
    this.canvas = el('canvas', { className: 'spark' });
    this.canvas.width = 240;
    this.canvas.height = 48;
    this.element = el(
      'li',
      { className: 'ticker' },
      el('span', { className: 'symbol', text: symbol }),
      this.price,
      this.change,
      this.canvas,
    );
    this.element.dataset.symbol = symbol;
  }

  /** Adds a tick in offset order, ignoring one already seen (history and live overlap). */
  add(offset: number, data: unknown): void {
    const price = Number((data as { price?: unknown } | null)?.price);
    if (!Number.isFinite(price) || this.ticks.some((t) => t.offset === offset)) return;
    this.ticks.push({ offset, price });
    this.ticks.sort((a, b) => a.offset - b.offset);
    if (this.ticks.length > SPARK_POINTS) this.ticks.splice(0, this.ticks.length - SPARK_POINTS);
    this.render();
  }

  private render(): void {
    const last = this.ticks[this.ticks.length - 1];
    this.price.textContent = String(last.price);
    const first = this.ticks[0].price;
    const delta = last.price - first;
    this.change.textContent = `${delta >= 0 ? '▲' : '▼'} ${Math.abs(delta).toFixed(2)}`;
    this.change.dataset.dir = delta >= 0 ? 'up' : 'down';

    const g = this.canvas.getContext('2d');
    if (!g) return;
    const { width, height } = this.canvas;
    g.clearRect(0, 0, width, height);
    if (this.ticks.length < 2) return;
    const prices = this.ticks.map((t) => t.price);
    const lo = Math.min(...prices);
    const span = Math.max(...prices) - lo || 1;
    g.strokeStyle = delta >= 0 ? '#22c55e' : '#ef4444';
    g.lineWidth = 2;
    g.beginPath();
    prices.forEach((p, i) => {
      const x = (i / (SPARK_POINTS - 1)) * (width - 4) + 2;
      const y = height - 3 - ((p - lo) / span) * (height - 6);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  }
}

export class BoardView implements View {
  private readonly subs: Subscription[] = [];

  constructor(root: HTMLElement, context: AppContext) {
    const { config, services, client } = context;
    const tickers = el('ul', { className: 'tickers' });
    const iotLog = el('ol', { className: 'iot-log', testid: 'iot-log' });
    const device = config.device ? new DevicePanel(client, config.device) : null;
    root.append(
      el(
        'div',
        { className: 'board' },
        el(
          'div',
          { className: 'panel' },
          el('h2', { text: 'Tickers' }),
          serviceBanner(services, ['stream-ingest'], 'no new prices arrive.'),
          tickers,
        ),
        el(
          'div',
          { className: 'panel' },
          el('h2', { text: 'IoT telemetry' }),
          serviceBanner(services, ['mqtt-bridge'], 'no device telemetry arrives and no command reaches a device.'),
          ...(device ? [device.element] : []),
          iotLog,
        ),
      ),
    );

    for (const symbol of config.ticker_symbols) {
      const ticker = new Ticker(symbol);
      tickers.append(ticker.element);
      this.follow(client.getSubscription(config.ticker_prefix + symbol), config.ticker_prefix + symbol, context, (o, d) =>
        ticker.add(o, d),
      );
    }

    const seen = new Set<string>();
    const addIot = (channel: string, offset: number, data: unknown): void => {
      const id = `${channel}#${offset}`;
      if (seen.has(id)) return;
      seen.add(id);
      // The device's own readings keep its panel current between commands.
      const from = (data as { device?: unknown } | null)?.device;
      if (device && from === config.device?.name) device.showState(data);
      const li = el(
        'li',
        {},
        el('span', { className: 'channel', text: channel.replace(/^mqtt:/, '') }),
        el('code', { text: typeof data === 'string' ? data : JSON.stringify(data) }),
      );
      li.dataset.offset = String(offset);
      li.dataset.channel = channel;
      let before: Element | null = null; // newest first
      for (const node of iotLog.children) {
        if (Number((node as HTMLElement).dataset.offset) < offset) {
          before = node;
          break;
        }
      }
      iotLog.insertBefore(li, before);
      while (iotLog.children.length > IOT_KEEP) iotLog.lastElementChild!.remove();
    };
    for (const channel of config.iot_channels) {
      this.follow(client.getSubscription(channel), channel, context, (o, d) => addIot(channel, o, d));
    }
    if (device && config.device) {
      const channel = config.device.state_channel;
      this.follow(client.getSubscription(channel), channel, context, (_offset, data) => device.showState(data));
    }
  }

  show(): void {
    // Subscriptions stay live while hidden, so the board is current when shown again.
  }

  /** Subscribes; on every (re)subscribe loads the channel's recent history, then live publications. */
  private follow(
    existing: Subscription | null,
    channel: string,
    context: AppContext,
    add: (offset: number, data: unknown) => void,
  ): void {
    // Fossil deltas where the namespace grants them (stream: does): a ticker update differs from the last
    // in a few digits. Other namespaces answer without delta and publications come in full.
    const sub = existing ?? context.client.newSubscription(channel, { delta: 'fossil' });
    sub.on('publication', (ctx: PublicationContext) => {
      if (ctx.offset !== undefined) add(ctx.offset, ctx.data);
    });
    sub.on('subscribed', () => {
      sub
        .history({ limit: 10, reverse: true })
        .then((history) => {
          for (const p of history.publications.reverse()) if (p.offset !== undefined) add(p.offset, p.data);
        })
        .catch((error: unknown) => console.warn(`history of ${channel}`, error));
    });
    sub.on('error', (ctx) => console.warn(`${channel}:`, ctx.error));
    sub.subscribe();
    this.subs.push(sub);
  }
}
