/** The native-protocol connection (stock centrifuge SDK, JSON) shared by every view. */

import { Centrifuge, UnauthorizedError } from 'centrifuge';

import { wsUrl, type WebConfig } from './config';
import { SessionExpired, type Session } from './session';

const TOKEN_REVOKED = 3500;
/** Why the last session of this tab ended, for the login form after the reload. */
export const ENDED_KEY = 'tsunagu.session-ended';

/** The transports `?transport=` picks (docs/protocol.md): one of them, or `auto`, WebSocket first and the
 * emulation transports as fallbacks (what a network that blocks WebSocket needs). Remembered per tab. */
const TRANSPORTS = ['websocket', 'http_stream', 'sse'] as const;
type TransportName = (typeof TRANSPORTS)[number];
const TRANSPORT_KEY = 'tsunagu.transport';

function chosenTransports(): TransportName[] | null {
  const asked = new URLSearchParams(location.search).get('transport');
  if (asked !== null) sessionStorage.setItem(TRANSPORT_KEY, asked);
  const choice = asked ?? sessionStorage.getItem(TRANSPORT_KEY) ?? 'websocket';
  if (choice === 'auto') return [...TRANSPORTS];
  if ((TRANSPORTS as readonly string[]).includes(choice)) return [choice as TransportName];
  console.warn(`?transport=${choice}: not one of auto, ${TRANSPORTS.join(', ')}; using websocket`);
  return null;
}

function endpoints(config: WebConfig): string | { transport: TransportName; endpoint: string }[] {
  const chosen = chosenTransports();
  if (chosen === null || (chosen.length === 1 && chosen[0] === 'websocket')) return wsUrl(config.native_path);
  const url = (path: string): string => `${location.origin}${path}`;
  const endpoint: Record<TransportName, string> = {
    websocket: wsUrl(config.native_path),
    http_stream: url('/connection/http_stream'),
    sse: url('/connection/sse'),
  };
  return chosen.map((transport) => ({ transport, endpoint: endpoint[transport] }));
}

export function connect(config: WebConfig, session: Session, indicator: HTMLElement): Centrifuge {
  const client = new Centrifuge(endpoints(config), {
    emulationEndpoint: `${location.origin}/emulation`,
    token: session.accessToken ?? '',
    getToken: async () => {
      try {
        return await session.token();
      } catch (error) {
        // Refused for good: the SDK stops; the session logs out (login form). Otherwise it retries.
        if (error instanceof SessionExpired) throw new UnauthorizedError('session expired');
        throw error;
      }
    },
    minReconnectDelay: 500,
    maxReconnectDelay: 10000,
  });
  const show = (state: string): void => {
    indicator.textContent = state;
    indicator.dataset.state = state;
  };
  client.on('state', (ctx) => show(ctx.newState));
  // Which transport carries the connection (`?transport=`), on the indicator.
  client.on('connected', (ctx) => {
    indicator.dataset.transport = ctx.transport;
    indicator.title = `connected over ${ctx.transport}`;
  });
  client.on('error', (ctx) => console.warn('connection error', ctx.error));
  // 3500: the gateway closed it because auth revoked the token or its session (ended from another
  // session or the console). A refused refresh logs this tab out; a session that lives on reconnects.
  client.on('disconnected', (ctx) => {
    if (ctx.code !== TOKEN_REVOKED) return;
    sessionStorage.setItem(ENDED_KEY, ctx.reason || 'token revoked');
    session.refresh().then(
      () => {
        sessionStorage.removeItem(ENDED_KEY);
        client.connect();
      },
      () => undefined,
    );
  });
  show(client.state);
  client.connect();
  // A token refreshed in the background also reaches the connection on its next reconnect via getToken.
  window.addEventListener('online', () => {
    if (client.state === 'connecting') client.connect();
  });
  return client;
}
