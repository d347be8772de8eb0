/** Chat: rooms, the message log (history, then live; deduplicated by offset), presence, a typing
 * indicator, and sending through the offline outbox (works offline, sent once back online). */

import type { PublicationContext, Subscription, SubscribedContext } from 'centrifuge';
import { OfflinePublisher, type Ack, type FailedPublication, type QueuedPublication } from '@tsunagu/offline-client';

import { el, userColor, type AppContext, type View } from './view';

const HISTORY_LIMIT = 50;
const MAX_MESSAGES = 500;
const TYPING_SEND_EVERY_MS = 1500;
const TYPING_SHOW_MS = 3500;
const ROOM_KEY = 'tsunagu.chat.room';

interface Message {
  offset: number;
  user: string;
  text: string;
  sentAt: string;
  /** Published through the server API (a backend), not by a connected user. */
  fromServer: boolean;
  /** No time came with it: `sentAt` is when this tab received it. */
  receivedAt: boolean;
}

interface RoomState {
  epoch: string | null;
  messages: Map<number, Message>;
}

interface ChatData {
  text?: unknown;
  user?: unknown;
  author?: unknown;
  from?: unknown;
  sent_at?: unknown;
  time?: unknown;
  ts?: unknown;
}

/** Who sent it and when, from the publication around the data (live or from history). */
interface Envelope {
  info?: { user?: string };
  tags?: Record<string, string>;
}

const SERVER_AUTHOR = 'server';

const firstString = (...values: unknown[]): string => {
  for (const value of values) if (typeof value === 'string' && value) return value;
  return '';
};
const firstTime = (...values: unknown[]): string => {
  for (const value of values) if ((typeof value === 'string' && value) || typeof value === 'number') return String(value);
  return '';
};

/** A chat message from a publication's data. The app sends `{text, user, sent_at}`; a backend publishing
 * through the server API may send only `{text}` (or name `author`/`from`, `time`/`ts`, or tags `user`,
 * `sent_at`): it shows as "server", at the time it arrived when it carries none (`live`). */
function toMessage(offset: number, data: unknown, envelope: Envelope = {}, live = false, fallbackUser = ''): Message | null {
  if (typeof data !== 'object' || data === null) return null;
  const d = data as ChatData;
  if (typeof d.text !== 'string') return null;
  const named = firstString(d.user, d.author, d.from, envelope.info?.user, envelope.tags?.user, fallbackUser);
  const sent = firstTime(d.sent_at, d.time, d.ts, envelope.tags?.sent_at);
  return {
    offset,
    user: named || SERVER_AUTHOR,
    text: d.text,
    sentAt: sent || (live ? new Date().toISOString() : ''),
    fromServer: !named,
    receivedAt: !sent && live,
  };
}

function roomName(channel: string): string {
  return channel.includes(':') ? channel.slice(channel.indexOf(':') + 1) : channel;
}

function clock(sentAt: string): string {
  const date = new Date(/^\d+$/.test(sentAt) ? Number(sentAt) : sentAt);
  return Number.isNaN(date.getTime()) ? '' : date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

export class ChatView implements View {
  private readonly rooms = new Map<string, RoomState>();
  private room: string;
  private sub: Subscription | null = null;
  private typingSub: Subscription | null = null;
  private publisher: OfflinePublisher | null = null;
  private presence = new Map<string, number>();
  private typingUsers = new Map<string, number>();
  private typingSentAt = 0;

  private readonly roomList = el('ul', { className: 'rooms' });
  private readonly log = el('ol', { className: 'chat-log', testid: 'chat-log' });
  private readonly pendingList = el('ul', { className: 'chat-pending-log' });
  private readonly presenceList = el('ul', { className: 'presence', testid: 'presence-list' });
  private readonly typing = el('p', { className: 'typing', testid: 'typing' });
  private readonly input = el('input', { className: 'chat-input', testid: 'chat-input' });
  private readonly send = el('button', { testid: 'chat-send', text: 'Send' });
  private readonly pendingBadge = el('span', { className: 'badge', testid: 'chat-pending', text: '0' });
  private readonly title = el('h2');

  constructor(
    root: HTMLElement,
    private readonly context: AppContext,
  ) {
    const { config } = context;
    const saved = localStorage.getItem(ROOM_KEY);
    this.room = saved && config.chat_rooms.includes(saved) ? saved : config.chat_rooms[0];

    for (const channel of config.chat_rooms) {
      const button = el('button', { testid: `chat-room-${roomName(channel)}`, text: `# ${roomName(channel)}` });
      button.type = 'button';
      button.dataset.channel = channel;
      button.addEventListener('click', () => this.switchRoom(channel));
      this.roomList.append(el('li', {}, button));
    }
    this.input.placeholder = 'Message (Enter sends; works offline)';
    this.input.maxLength = 2000;
    this.input.autocomplete = 'off';
    this.send.type = 'button';
    this.send.addEventListener('click', () => void this.submit());
    this.input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        void this.submit();
      }
    });
    this.input.addEventListener('input', () => this.sendTyping());

    root.append(
      el(
        'div',
        { className: 'chat' },
        el('aside', { className: 'panel' }, el('h3', { text: 'Rooms' }), this.roomList),
        el(
          'div',
          { className: 'panel chat-main' },
          this.title,
          this.log,
          this.pendingList,
          this.typing,
          el(
            'div',
            { className: 'composer' },
            this.input,
            this.send,
            el('span', { className: 'pending-label' }, this.pendingBadge, ' pending'),
          ),
        ),
        el('aside', { className: 'panel' }, el('h3', { text: 'Online' }), this.presenceList),
      ),
    );
    window.setInterval(() => this.renderTyping(), 1000);
    void this.openPublisher();
    this.switchRoom(this.room, true);
  }

  show(): void {
    this.input.focus();
  }

  // outbox

  private async openPublisher(): Promise<void> {
    try {
      this.publisher = await OfflinePublisher.open(this.context.client, {
        dbName: `tsunagu-outbox-${this.context.user}`,
      });
    } catch (error) {
      console.error('offline outbox unavailable', error);
      this.pendingList.replaceChildren(el('li', { className: 'failed', text: `Cannot send: ${String(error)}` }));
      return;
    }
    this.publisher.on('acked', (ack: Ack) => {
      const message = toMessage(ack.offset, ack.data, {}, true, this.context.user);
      if (message) this.add(ack.channel, message, ack.epoch);
    });
    this.publisher.on('change', () => void this.renderPending());
    await this.renderPending();
  }

  private async submit(): Promise<void> {
    const text = this.input.value.trim();
    if (!text || !this.publisher) return;
    this.input.value = '';
    this.typingSentAt = 0;
    await this.publisher.publish(this.room, { text, user: this.context.user, sent_at: new Date().toISOString() });
    await this.renderPending();
  }

  private async renderPending(): Promise<void> {
    if (!this.publisher) return;
    const [pending, failed] = await Promise.all([this.publisher.pending(), this.publisher.failed()]);
    this.pendingBadge.textContent = String(pending.length);
    this.pendingBadge.classList.toggle('nonzero', pending.length > 0);
    const item = (entry: QueuedPublication | FailedPublication, failure?: string): HTMLLIElement => {
      const data = entry.data as ChatData;
      const li = el(
        'li',
        { className: failure ? 'failed' : 'pending' },
        el('span', { className: 'user', text: String(data.user ?? '') }),
        el('span', { className: 'text', text: String(data.text ?? '') }),
        el('span', { className: 'state', text: failure ?? 'pending' }),
      );
      li.dataset.key = entry.key;
      return li;
    };
    this.pendingList.replaceChildren(
      ...failed.filter((e) => e.channel === this.room).map((e) => item(e, `not sent: ${e.message}`)),
      ...pending.filter((e) => e.channel === this.room).map((e) => item(e)),
    );
  }

  // rooms

  private state(channel: string): RoomState {
    let state = this.rooms.get(channel);
    if (!state) {
      state = { epoch: null, messages: new Map() };
      this.rooms.set(channel, state);
    }
    return state;
  }

  private switchRoom(channel: string, force = false): void {
    if (channel === this.room && !force) return;
    const { client, config } = this.context;
    for (const old of [this.sub, this.typingSub]) {
      if (old) {
        old.removeAllListeners();
        old.unsubscribe();
        client.removeSubscription(old);
      }
    }
    this.room = channel;
    localStorage.setItem(ROOM_KEY, channel);
    this.title.textContent = `# ${roomName(channel)}`;
    for (const button of this.roomList.querySelectorAll<HTMLButtonElement>('button')) {
      button.classList.toggle('active', button.dataset.channel === channel);
    }
    this.presence.clear();
    this.typingUsers.clear();
    this.renderPresence();
    this.renderTyping();
    this.renderLog();
    void this.renderPending();

    const sub = client.getSubscription(channel) ?? client.newSubscription(channel, { joinLeave: true });
    sub.on('subscribed', (ctx) => void this.onSubscribed(sub, ctx));
    sub.on('publication', (ctx: PublicationContext) => {
      if (ctx.offset === undefined) return;
      const message = toMessage(ctx.offset, ctx.data, ctx, true);
      if (message) this.add(channel, message);
    });
    sub.on('join', (ctx) => this.changePresence(ctx.info.user, +1));
    sub.on('leave', (ctx) => this.changePresence(ctx.info.user, -1));
    sub.on('error', (ctx) => console.warn(`${channel}:`, ctx.error));
    sub.subscribe();
    this.sub = sub;

    const typingChannel = config.typing_prefix + roomName(channel);
    const typing = client.getSubscription(typingChannel) ?? client.newSubscription(typingChannel);
    typing.on('publication', (ctx) => {
      const data = ctx.data as { user?: unknown; typing?: unknown };
      const user = typeof data?.user === 'string' ? data.user : ctx.info?.user;
      if (!user || user === this.context.user) return;
      if (data.typing === false) this.typingUsers.delete(user);
      else this.typingUsers.set(user, Date.now());
      this.renderTyping();
    });
    typing.subscribe();
    this.typingSub = typing;
  }

  private async onSubscribed(sub: Subscription, ctx: SubscribedContext): Promise<void> {
    const channel = sub.channel;
    const state = this.state(channel);
    if (ctx.streamPosition && state.epoch !== null && ctx.streamPosition.epoch !== state.epoch) {
      state.messages.clear(); // the channel's history was reset: old offsets mean nothing now
      if (channel === this.room) this.renderLog();
    }
    if (ctx.streamPosition) state.epoch = ctx.streamPosition.epoch;
    try {
      // The last messages, newest first; live publications that overlap are deduplicated by offset.
      const history = await sub.history({ limit: HISTORY_LIMIT, reverse: true });
      for (const publication of history.publications) {
        if (publication.offset === undefined) continue;
        const message = toMessage(publication.offset, publication.data, publication);
        if (message) this.add(channel, message, history.epoch);
      }
    } catch (error) {
      console.warn(`history of ${channel}`, error);
    }
    try {
      const presence = await sub.presence();
      if (sub !== this.sub) return;
      this.presence.clear();
      for (const info of Object.values(presence.clients)) this.changePresence(info.user, +1, false);
      this.renderPresence();
    } catch (error) {
      console.warn(`presence of ${channel}`, error);
    }
  }

  // messages

  private add(channel: string, message: Message, epoch?: string): void {
    const state = this.state(channel);
    if (epoch && state.epoch === null) state.epoch = epoch;
    if (epoch && state.epoch !== epoch) return; // from an older history epoch
    if (state.messages.has(message.offset)) return;
    state.messages.set(message.offset, message);
    if (state.messages.size > MAX_MESSAGES) {
      const oldest = Math.min(...state.messages.keys());
      state.messages.delete(oldest);
      if (channel === this.room) this.log.querySelector(`li[data-offset="${oldest}"]`)?.remove();
    }
    if (channel !== this.room) return;
    this.insert(message);
    if (message.user) this.typingUsers.delete(message.user);
  }

  private renderLog(): void {
    this.log.replaceChildren();
    const messages = [...this.state(this.room).messages.values()].sort((a, b) => a.offset - b.offset);
    for (const message of messages) this.insert(message);
  }

  /** Inserts in offset order (history arrives after, or between, live messages). */
  private insert(message: Message): void {
    const atBottom = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 40;
    const li = el(
      'li',
      {},
      el('span', { className: 'user', text: message.user }),
      el('span', { className: 'text', text: message.text }),
      el('time', { text: clock(message.sentAt) }),
    );
    li.dataset.offset = String(message.offset);
    li.dataset.user = message.user;
    if (message.fromServer) li.classList.add('from-server');
    const time = li.querySelector('time')!;
    if (message.sentAt) time.dateTime = message.sentAt;
    if (message.receivedAt) time.title = 'received at (the message carries no time)';
    (li.firstChild as HTMLElement).style.color = userColor(message.user);
    let before: Element | null = null;
    for (let node = this.log.lastElementChild; node; node = node.previousElementSibling) {
      if (Number((node as HTMLElement).dataset.offset) > message.offset) before = node;
      else break;
    }
    this.log.insertBefore(li, before);
    if (atBottom || message.user === this.context.user) this.log.scrollTop = this.log.scrollHeight;
  }

  // presence and typing

  private changePresence(user: string, delta: number, render = true): void {
    if (!user) return;
    const count = (this.presence.get(user) ?? 0) + delta;
    if (count > 0) this.presence.set(user, count);
    else this.presence.delete(user);
    if (render) this.renderPresence();
  }

  private renderPresence(): void {
    const users = [...this.presence.keys()].sort();
    this.presenceList.replaceChildren(
      ...users.map((user) => {
        const li = el('li', { text: user });
        li.dataset.user = user;
        li.style.setProperty('--dot', userColor(user));
        if (user === this.context.user) li.classList.add('me');
        return li;
      }),
    );
  }

  private sendTyping(): void {
    const now = Date.now();
    if (!this.input.value || now - this.typingSentAt < TYPING_SEND_EVERY_MS) return;
    if (this.context.client.state !== 'connected' || this.typingSub?.state !== 'subscribed') return;
    this.typingSentAt = now;
    this.typingSub.publish({ user: this.context.user, typing: true }).catch(() => {
      // Ephemeral: a lost typing signal does not matter.
    });
  }

  private renderTyping(): void {
    const now = Date.now();
    for (const [user, at] of this.typingUsers) if (now - at > TYPING_SHOW_MS) this.typingUsers.delete(user);
    const users = [...this.typingUsers.keys()].sort();
    this.typing.textContent = users.length
      ? `${users.join(', ')} ${users.length > 1 ? 'are' : 'is'} typing…`
      : '';
  }
}
