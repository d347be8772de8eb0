/** The native-protocol connection (stock centrifuge SDK, JSON) shared by every view. */

import { Centrifuge, UnauthorizedError } from 'centrifuge';

import { wsUrl, type WebConfig } from './config';
import { SessionExpired, type Session } from './session';

const TOKEN_REVOKED = 3500;
/** Why the last session of this tab ended, for the login form after the reload. */
export const ENDED_KEY = 'tsunagu.session-ended';

export function connect(config: WebConfig, session: Session, indicator: HTMLElement): Centrifuge {
  const client = new Centrifuge(wsUrl(config.native_path), {
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
