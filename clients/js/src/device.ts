/**
 * Commands to a device over a WebRTC data channel, falling back to the platform's MQTT command path
 * (docs/webrtc.md). The device agent (`tsunagu device-agent`) answers the call on
 * `webrtc:control#<device>,<user>`, acknowledges each command on the data channel, and carries out each
 * command id once whichever path brings it; so when the channel cannot be made or drops, the commands not
 * yet acknowledged are sent again over MQTT (a publish to `mqtt:<topic>`, mqtt-bridge's receipts on
 * `replies:mqtt#<user>`), and every later one goes that way.
 */

import { PeerLink, type SignalingClient } from './webrtc.js';

export type CommandPath = 'connecting' | 'webrtc' | 'mqtt';

export interface DeviceControlOptions {
  client: SignalingClient & { publish(channel: string, data: unknown): Promise<unknown> };
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
        channel.onmessage = (event) => this.acknowledged(event.data);
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

  close(): void {
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

  private acknowledged(data: unknown): void {
    try {
      const { ack } = JSON.parse(String(data)) as { ack?: string };
      if (ack) this.unacked.delete(ack);
    } catch {
      /* not an acknowledgement */
    }
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
