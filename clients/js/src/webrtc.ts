/**
 * A WebRTC data channel between two users, signaled through the platform (docs/webrtc.md).
 *
 * Both parties subscribe to one user-limited channel of the `webrtc` namespace, `webrtc:<call>#<a>,<b>`,
 * which the gateway lets only those two users read or write. Messages on it:
 *   {"type": "hello"}                       I am here (sent on every subscribe, answered once)
 *   {"type": "offer" | "answer", "sdp": s}  the session descriptions
 *   {"type": "candidate", "candidate": c}   an ICE candidate (RTCIceCandidateInit)
 *   {"type": "bye"}                         the call is over
 * Who sent a message is the publication's `info.user`, which the gateway sets from the publisher's
 * connection: a message that does not come from the peer is ignored, whatever it says.
 */

/** The part of the centrifuge SDK's subscription this helper uses. */
export interface SignalingSubscription {
  on(event: 'publication', listener: (ctx: { data: unknown; info?: { user?: string } }) => void): unknown;
  on(event: 'subscribed', listener: (ctx: unknown) => void): unknown;
  subscribe(): void;
  unsubscribe(): void;
  removeAllListeners?(): unknown;
  publish(data: unknown): Promise<unknown>;
}

/** The part of the centrifuge SDK's client this helper uses (a `Centrifuge` fits). */
export interface SignalingClient {
  newSubscription(channel: string, options?: Record<string, unknown>): SignalingSubscription;
  getSubscription(channel: string): SignalingSubscription | null;
  removeSubscription?(subscription: SignalingSubscription | null): void;
}

export interface PeerLinkOptions {
  client: SignalingClient;
  /** A name for the call, shared by both parties (letters, digits, `-`, `_`, `.`). */
  call: string;
  user: string;
  peer: string;
  /** `iceServers` as auth's `POST /v1/turn-credentials` returns them; none: host candidates only. */
  iceServers?: RTCIceServer[];
  /** `relay` forces the TURN path. */
  iceTransportPolicy?: RTCIceTransportPolicy;
  /** Label of the data channel the caller opens. */
  label?: string;
  /** The party that makes the offer; by default the one whose name sorts first. */
  initiator?: boolean;
}

type Signal =
  | { type: 'hello' }
  | { type: 'bye' }
  | { type: 'offer' | 'answer'; sdp: string }
  | { type: 'candidate'; candidate: RTCIceCandidateInit };

/** The signaling channel of a call between two users: the same name whoever computes it. */
export function signalingChannel(call: string, a: string, b: string): string {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(call)) throw new Error(`call names are 1-64 of A-Z a-z 0-9 _ . -: ${call}`);
  return `webrtc:${call}#${[a, b].sort().join(',')}`;
}

export class PeerLink {
  readonly connection: RTCPeerConnection;
  readonly channelName: string;
  /** Resolves with the data channel once it is open. */
  readonly open: Promise<RTCDataChannel>;
  /** Signaling messages ignored because they did not come from the peer. */
  ignored = 0;
  private readonly subscription: SignalingSubscription;
  private readonly initiator: boolean;
  private started = false;
  private closed = false;
  private greeted = false;
  private readonly pending: RTCIceCandidateInit[] = [];
  private resolveOpen!: (channel: RTCDataChannel) => void;
  private rejectOpen!: (error: Error) => void;

  constructor(private readonly options: PeerLinkOptions) {
    const { client, call, user, peer } = options;
    this.channelName = signalingChannel(call, user, peer);
    this.initiator = options.initiator ?? user < peer;
    this.open = new Promise((resolve, reject) => {
      this.resolveOpen = resolve;
      this.rejectOpen = reject;
    });
    this.connection = new RTCPeerConnection({
      iceServers: options.iceServers ?? [],
      iceTransportPolicy: options.iceTransportPolicy ?? 'all',
    });
    this.connection.onicecandidate = (event) => {
      if (event.candidate) void this.send({ type: 'candidate', candidate: event.candidate.toJSON() });
    };
    this.connection.ondatachannel = (event) => this.watch(event.channel);
    this.connection.onconnectionstatechange = () => {
      if (this.connection.connectionState === 'failed') this.rejectOpen(new Error('the peer connection failed'));
    };
    // A link closed before on this channel left its subscription behind: this link makes its own, so the
    // old link's listeners never act on this call's signals.
    const stale = client.getSubscription(this.channelName);
    if (stale) client.removeSubscription?.(stale);
    this.subscription = client.getSubscription(this.channelName) ?? client.newSubscription(this.channelName);
    this.subscription.on('publication', (ctx) => {
      if (!this.closed) void this.receive(ctx.data, ctx.info?.user);
    });
    this.subscription.on('subscribed', () => {
      if (!this.closed) void this.send({ type: 'hello' });
    });
    this.subscription.subscribe();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    const subscription = this.subscription;
    // The bye first, then the subscription goes (its publish needs it).
    void this.send({ type: 'bye' }).finally(() => {
      subscription.unsubscribe();
      subscription.removeAllListeners?.();
      this.options.client.removeSubscription?.(subscription);
    });
    this.connection.close();
    this.rejectOpen(new Error('closed'));
  }

  private watch(channel: RTCDataChannel): void {
    if (channel.readyState === 'open') this.resolveOpen(channel);
    else channel.addEventListener('open', () => this.resolveOpen(channel), { once: true });
  }

  private async send(signal: Signal): Promise<void> {
    try {
      await this.subscription.publish(signal);
    } catch (error) {
      this.rejectOpen(error instanceof Error ? error : new Error(String(error)));
    }
  }

  private async receive(data: unknown, from: string | undefined): Promise<void> {
    if (from !== this.options.peer) {
      // Our own messages come back too (we are subscribed); anything else is not the peer's.
      if (from !== this.options.user) this.ignored += 1;
      return;
    }
    const signal = data as Signal;
    switch (signal?.type) {
      case 'hello':
        if (!this.greeted) {
          this.greeted = true;
          await this.send({ type: 'hello' }); // the peer may have subscribed after our first hello
        }
        if (this.initiator && !this.started) await this.call();
        return;
      case 'offer':
        if (this.initiator) return;
        await this.connection.setRemoteDescription({ type: 'offer', sdp: signal.sdp });
        await this.flushCandidates();
        await this.connection.setLocalDescription(await this.connection.createAnswer());
        await this.send({ type: 'answer', sdp: this.connection.localDescription?.sdp ?? '' });
        return;
      case 'answer':
        if (!this.initiator || this.connection.signalingState !== 'have-local-offer') return;
        await this.connection.setRemoteDescription({ type: 'answer', sdp: signal.sdp });
        await this.flushCandidates();
        return;
      case 'candidate':
        if (this.connection.remoteDescription) await this.connection.addIceCandidate(signal.candidate);
        else this.pending.push(signal.candidate);
        return;
      case 'bye':
        this.connection.close();
        this.rejectOpen(new Error('the peer hung up'));
        return;
      default:
        this.ignored += 1;
    }
  }

  private async call(): Promise<void> {
    this.started = true;
    this.watch(this.connection.createDataChannel(this.options.label ?? 'data', { ordered: true }));
    await this.connection.setLocalDescription(await this.connection.createOffer());
    await this.send({ type: 'offer', sdp: this.connection.localDescription?.sdp ?? '' });
  }

  private async flushCandidates(): Promise<void> {
    for (const candidate of this.pending.splice(0)) await this.connection.addIceCandidate(candidate);
  }
}
