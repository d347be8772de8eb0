/**
 * Commands to a device over a WebRTC data channel, falling back to the platform's MQTT command path
 * (docs/webrtc.md). The device agent (`tsunagu device-agent`) answers the call on
 * `webrtc:control#<device>,<user>`, acknowledges each command on the data channel, and carries out each
 * command id once whichever path brings it; so when the channel cannot be made or drops, the commands not
 * yet acknowledged are sent again over MQTT (a publish to `mqtt:<topic>`, mqtt-bridge's receipts on
 * `replies:mqtt#<user>`), and every later one goes that way.
 *
 * Telemetry comes both ways too: the agent sends each sample on the open data channel and some of them
 * (at the device's MQTT rate) to its telemetry topic, which mqtt-bridge relays to `mqtt:<topic>`. Samples
 * carry `seq` and `boot`: one that came by the other path first is not shown again.
 */

import { PeerLink, type SignalingClient, type SignalingSubscription } from './webrtc.js';

export type CommandPath = 'connecting' | 'webrtc' | 'mqtt';

/** A telemetry sample as the device agent sends it: its own fields, and `seq`, `boot`, `ts` (ms). */
export interface TelemetrySample {
  seq?: number;
  boot?: number;
  ts?: number;
  [field: string]: unknown;
}

export interface DeviceControlOptions {
  client: SignalingClient & {
    publish(channel: string, data: unknown): Promise<unknown>;
    removeSubscription?(subscription: SignalingSubscription | null): void;
  };
  user: string;
  device: string;
  /** The device's MQTT command topic, for the fallback. */
  commandTopic: string;
  iceServers?: RTCIceServer[];
  iceTransportPolicy?: RTCIceTransportPolicy;
  /** Milliseconds to wait for the data channel before commands go over MQTT. */
  connectTimeout?: number;
  /** Told whenever the path changes (the UI shows which one is in use). */
  onPath?: (path: CommandPath) => void;
  /** The device's MQTT telemetry topic: samples also come from `mqtt:<topic>`. */
  telemetryTopic?: string;
  /** Each new telemetry sample, with the path that brought it first. */
  onTelemetry?: (sample: TelemetrySample, path: 'webrtc' | 'mqtt') => void;
  /** The topic the agent acknowledges MQTT-borne commands on (its `--ack-topic`). */
  ackTopic?: string;
  /** The device has command `id`, acknowledged over that path. */
  onAck?: (id: string, path: 'webrtc' | 'mqtt') => void;
}

interface Pending {
  id: string;
  payload: unknown;
}

export class DeviceControl {
  readonly link: PeerLink;
  path: CommandPath = 'connecting';
  private channel: RTCDataChannel | null = null;
  private readonly unacked = new Map<string, Pending>();
  private readonly waiting: Pending[] = [];
  private readonly prefix = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  private sequence = 0;
  private fallback: Promise<void> = Promise.resolve();
  private lastSample = { boot: 0, seq: 0 };
  private readonly subscriptions: SignalingSubscription[] = [];

  constructor(private readonly options: DeviceControlOptions) {
    this.link = new PeerLink({
      client: options.client,
      call: 'control',
      user: options.user,
      peer: options.device,
      iceServers: options.iceServers,
      iceTransportPolicy: options.iceTransportPolicy,
      label: 'commands',
      initiator: true,
    });
    const timer = setTimeout(() => this.toMqtt(), options.connectTimeout ?? 10_000);
    this.link.open.then(
      (channel) => {
        clearTimeout(timer);
        if (this.path === 'mqtt') return; // too late: MQTT has taken over
        this.channel = channel;
        channel.onmessage = (event) => this.fromChannel(event.data);
        channel.onclose = () => this.toMqtt();
        this.setPath('webrtc');
        for (const command of this.waiting.splice(0)) this.overChannel(command);
      },
      () => this.toMqtt(),
    );
    this.link.connection.addEventListener('connectionstatechange', () => {
      const state = this.link.connection.connectionState;
      if (state === 'failed' || state === 'disconnected' || state === 'closed') this.toMqtt();
    });
    if (options.telemetryTopic)
      this.follow(`mqtt:${options.telemetryTopic}`, (data) => this.telemetry(data as TelemetrySample, 'mqtt'));
    if (options.ackTopic)
      this.follow(`mqtt:${options.ackTopic}`, (data) => {
        const ack = (data as { ack?: unknown } | null)?.ack;
        if (typeof ack === 'string' && ack.startsWith(`${this.prefix}-`)) this.options.onAck?.(ack, 'mqtt');
      });
  }

  /** Sends one command; its id (the device carries it out once). */
  send(payload: unknown): string {
    this.sequence += 1;
    const command = { id: `${this.prefix}-${this.sequence}`, payload };
    if (this.path === 'webrtc') this.overChannel(command);
    else if (this.path === 'mqtt') this.overMqtt(command);
    else this.waiting.push(command);
    return command.id;
  }

  /** Resolves once every command sent over MQTT so far was accepted by the gateway (it is on Kafka). */
  sentOverMqtt(): Promise<void> {
    return this.fallback;
  }

  /** Commands sent over the data channel and not yet acknowledged. */
  get inFlight(): number {
    return this.unacked.size;
  }

  /** Closes the data channel (as a failed network would): commands and telemetry go on over MQTT. */
  dropLink(): void {
    this.link.close();
    this.toMqtt();
  }

  close(): void {
    for (const subscription of this.subscriptions.splice(0)) {
      subscription.unsubscribe();
      this.options.client.removeSubscription?.(subscription);
    }
    this.link.close();
  }

  private overChannel(command: Pending): void {
    this.unacked.set(command.id, command);
    try {
      this.channel?.send(JSON.stringify(command));
    } catch {
      this.toMqtt();
    }
  }

  private overMqtt(command: Pending): void {
    // In order: each publish waits for the one before it (the gateway acknowledges it on Kafka).
    this.fallback = this.fallback.then(() =>
      this.options.client.publish(`mqtt:${this.options.commandTopic}`, command).then(
        () => undefined,
        (error: unknown) => console.warn('device command over MQTT', command.id, error),
      ),
    );
  }

  private fromChannel(data: unknown): void {
    let message: { ack?: unknown; telemetry?: TelemetrySample };
    try {
      message = JSON.parse(String(data)) as typeof message;
    } catch {
      return; // not ours
    }
    if (typeof message.ack === 'string') {
      this.unacked.delete(message.ack);
      this.options.onAck?.(message.ack, 'webrtc');
    } else if (message.telemetry && typeof message.telemetry === 'object') {
      this.telemetry(message.telemetry, 'webrtc');
    }
  }

  private telemetry(sample: TelemetrySample, path: 'webrtc' | 'mqtt'): void {
    if (!sample || typeof sample !== 'object') return;
    const { seq, boot } = sample;
    if (typeof seq === 'number' && typeof boot === 'number') {
      // A restarted agent counts again from 1 under a new boot; older boots are late copies.
      if (boot < this.lastSample.boot || (boot === this.lastSample.boot && seq <= this.lastSample.seq)) return;
      this.lastSample = { boot, seq };
    }
    this.options.onTelemetry?.(sample, path);
  }

  private follow(channel: string, listener: (data: unknown) => void): void {
    const client = this.options.client;
    const existing = client.getSubscription(channel);
    const subscription = existing ?? client.newSubscription(channel);
    subscription.on('publication', (ctx) => listener(ctx.data));
    subscription.subscribe();
    // One the page had before is left to it (with this listener, which ignores what is not ours).
    if (!existing) this.subscriptions.push(subscription);
  }

  private toMqtt(): void {
    if (this.path === 'mqtt') return;
    this.setPath('mqtt');
    this.channel = null;
    // What the channel did not confirm goes again (the device drops an id it already carried out), then
    // what waited for a path, in the order they were sent.
    const again = [...this.unacked.values(), ...this.waiting.splice(0)];
    this.unacked.clear();
    for (const command of again) this.overMqtt(command);
  }

  private setPath(path: CommandPath): void {
    this.path = path;
    this.options.onPath?.(path);
  }
}
