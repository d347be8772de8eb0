/** Device: remote control of a device agent (`tsunagu device-agent`, docs/webrtc.md). Pick a device, see its
 * telemetry and send it commands: over a WebRTC data channel signaled through the platform, or over the
 * MQTT command path (gateway → Kafka → mqtt-bridge → broker) when the channel cannot be made or drops. The
 * view always shows which path is in use, and by which path each sample and acknowledgement came. */

import { DeviceControl, type CommandPath, type TelemetrySample } from '@tsunagu/offline-client';

import { authBase, type WebDevice } from '../config';
import { serviceBanner } from '../services';
import { el, type AppContext, type View } from './view';

const COMMANDS_KEPT = 30;
/** How long to wait for the data channel before commands go over MQTT. */
const CONNECT_TIMEOUT = 8_000;
/** Sample fields the view does not list (the agent's bookkeeping). */
const BOOKKEEPING = new Set(['seq', 'boot', 'ts', 'device']);

const PATH_TEXT: Record<CommandPath, string> = {
  connecting: 'connecting: setting up the data channel…',
  webrtc: 'data channel (WebRTC, peer to peer)',
  mqtt: 'MQTT (gateway → Kafka → mqtt-bridge → broker)',
};

/** ICE servers from auth (`POST /v1/turn-credentials`); none (host candidates only) where no TURN is set. */
async function iceServers(context: AppContext): Promise<{ servers: RTCIceServer[]; note: string }> {
  try {
    const token = await context.session.token();
    const response = await fetch(`${authBase(context.config)}/v1/turn-credentials`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}` },
    });
    if (response.status === 404) return { servers: [], note: 'no TURN server configured: direct paths only' };
    if (!response.ok) return { servers: [], note: `TURN credentials refused (HTTP ${response.status})` };
    const body = (await response.json()) as { iceServers?: RTCIceServer[] };
    return { servers: body.iceServers ?? [], note: 'STUN/TURN from auth' };
  } catch (error) {
    return { servers: [], note: `no TURN credentials: ${String(error)}` };
  }
}

function shortPath(path: 'webrtc' | 'mqtt'): string {
  return path === 'webrtc' ? 'data channel' : 'MQTT';
}

export class DeviceView implements View {
  private control: DeviceControl | null = null;
  private calling = '';
  private readonly pick = el('select', { testid: 'dv-pick' });
  private readonly path = el('p', { className: 'dv-path', testid: 'dv-path', text: 'no device picked' });
  private readonly ice = el('p', { className: 'dv-ice', testid: 'dv-ice' });
  private readonly fields = el('dl', { className: 'dv-fields', testid: 'dv-telemetry' });
  private readonly sampleInfo = el('p', { className: 'dv-sample', testid: 'dv-sample', text: 'no telemetry yet' });
  private readonly payload = el('input', { testid: 'dv-payload' });
  private readonly send = el('button', { testid: 'dv-send', text: 'Send' });
  private readonly drop = el('button', { testid: 'dv-drop', text: 'Drop the data channel' });
  private readonly call = el('button', { testid: 'dv-call', text: 'Call again' });
  private readonly commands = el('ol', { className: 'dv-commands', testid: 'dv-commands' });
  private readonly counts = { webrtc: 0, mqtt: 0 };
  private readonly rows = new Map<string, HTMLLIElement>();

  constructor(
    root: HTMLElement,
    private readonly context: AppContext,
  ) {
    const devices = context.config.devices ?? [];
    for (const device of devices) this.pick.append(new Option(device.device, device.device));
    this.pick.addEventListener('change', () => {
      if (this.pick.value !== this.calling) void this.connect();
    });
    this.payload.value = '{"speed": 1}';
    this.payload.placeholder = 'a command: JSON';
    this.payload.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') this.command();
    });
    for (const button of [this.send, this.drop, this.call]) button.type = 'button';
    this.send.addEventListener('click', () => this.command());
    this.drop.addEventListener('click', () => this.control?.dropLink());
    this.call.addEventListener('click', () => void this.connect());
    root.append(
      el(
        'div',
        { className: 'panel device-view' },
        el('h2', { text: 'Device' }),
        serviceBanner(context.services, ['mqtt-bridge'], 'the MQTT fallback carries no commands or telemetry.'),
        devices.length
          ? el('label', { className: 'dv-picker' }, 'Device ', this.pick)
          : el('p', {
              testid: 'dv-none',
              text: 'No devices configured: list them in TSUNAGU_GATEWAY_WEB_DEMO ("devices") and start their agents.',
            }),
        this.path,
        this.ice,
        el('div', { className: 'dv-buttons' }, this.drop, this.call),
        el('h3', { text: 'Telemetry' }),
        this.sampleInfo,
        this.fields,
        el('h3', { text: 'Commands' }),
        el('div', { className: 'device-form' }, this.payload, this.send),
        this.commands,
      ),
    );
    if (devices.length) void this.connect();
  }

  hide(): void {
    // The link stays up while hidden: commands and telemetry keep their path.
  }

  private device(): WebDevice | undefined {
    return this.context.config.devices?.find((d) => d.device === this.pick.value);
  }

  private async connect(): Promise<void> {
    this.control?.close();
    this.control = null;
    const device = this.device();
    this.calling = device?.device ?? '';
    if (!device) return;
    this.showPath('connecting');
    this.fields.replaceChildren();
    this.sampleInfo.textContent = 'no telemetry yet';
    this.counts.webrtc = this.counts.mqtt = 0;
    const { servers, note } = await iceServers(this.context);
    this.ice.textContent = note;
    if (this.device() !== device) return; // picked another meanwhile
    this.control = new DeviceControl({
      client: this.context.client,
      user: this.context.user,
      device: device.device,
      commandTopic: device.command_topic,
      telemetryTopic: device.telemetry_topic,
      ackTopic: device.ack_topic,
      iceServers: servers,
      connectTimeout: CONNECT_TIMEOUT,
      onPath: (path) => this.showPath(path),
      onTelemetry: (sample, path) => this.showSample(sample, path),
      onAck: (id, path) => this.acknowledged(id, path),
    });
  }

  private showPath(path: CommandPath): void {
    this.path.dataset.path = path;
    this.path.textContent = `Path: ${PATH_TEXT[path]}`;
    this.drop.disabled = path !== 'webrtc';
  }

  private showSample(sample: TelemetrySample, path: 'webrtc' | 'mqtt'): void {
    this.counts[path] += 1;
    const rows: HTMLElement[] = [];
    for (const [name, value] of Object.entries(sample)) {
      if (BOOKKEEPING.has(name)) continue;
      const dd = el('dd', { text: typeof value === 'string' ? value : JSON.stringify(value) });
      dd.dataset.field = name;
      rows.push(el('dt', { text: name }), dd);
    }
    this.fields.replaceChildren(...rows);
    this.sampleInfo.dataset.path = path;
    this.sampleInfo.dataset.seq = String(sample.seq ?? '');
    const age = typeof sample.ts === 'number' ? ` · ${Math.max(0, Math.round(Date.now() - sample.ts))} ms old` : '';
    this.sampleInfo.textContent =
      `sample ${sample.seq ?? '?'} by ${shortPath(path)}${age} · ` +
      `${this.counts.webrtc} by data channel, ${this.counts.mqtt} by MQTT`;
  }

  private command(): void {
    if (!this.control) return;
    let payload: unknown;
    try {
      payload = JSON.parse(this.payload.value);
    } catch {
      this.payload.setCustomValidity('send JSON, e.g. {"speed": 1}');
      this.payload.reportValidity();
      return;
    }
    this.payload.setCustomValidity('');
    const path = this.control.path;
    const id = this.control.send(payload);
    const li = el(
      'li',
      {},
      el('code', { text: JSON.stringify(payload) }),
      el('span', { className: 'dv-state', text: path === 'connecting' ? 'waiting for a path' : `sent by ${path}` }),
    );
    li.dataset.id = id;
    li.dataset.state = 'sent';
    this.commands.prepend(li);
    this.rows.set(id, li);
    while (this.commands.children.length > COMMANDS_KEPT) {
      const last = this.commands.lastElementChild as HTMLLIElement;
      this.rows.delete(last.dataset.id ?? '');
      last.remove();
    }
  }

  private acknowledged(id: string, path: 'webrtc' | 'mqtt'): void {
    const li = this.rows.get(id);
    if (!li || li.dataset.state === 'acked') return;
    li.dataset.state = 'acked';
    li.dataset.path = path;
    li.querySelector('.dv-state')!.textContent = `carried out · acknowledged by ${shortPath(path)}`;
  }
}
