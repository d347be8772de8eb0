/** "Was this you?": auth tells each user's own channel (`user:#<name>`) of a new login, a new second
 * factor or an ended session; every tab of the user shows them (Zero Trust style notifications). */

import type { Centrifuge } from 'centrifuge';

import type { Session } from './session';

interface SessionSummary {
  id: string;
  ip: string;
  device: string;
}

interface Notice {
  type: 'login' | 'session_ended' | 'sessions_ended' | 'factor_added';
  time: number;
  session?: SessionSummary;
  by?: string;
  reason?: string;
  factor?: string;
  count?: number;
}

/** auth's `notify_namespace` (its default). */
const NAMESPACE = 'user';

function where(session: SessionSummary | undefined): string {
  if (!session) return 'a device';
  return session.ip ? `${session.device} from ${session.ip}` : session.device;
}

export function describe(notice: Notice): string {
  switch (notice.type) {
    case 'login':
      return `New login to your account: ${where(notice.session)}. Was this you?`;
    case 'session_ended':
      return `A session of yours was ended: ${where(notice.session)} (by ${notice.by ?? 'auth'}${notice.reason ? `: ${notice.reason}` : ''}).`;
    case 'sessions_ended':
      return `All your sessions were ended by ${notice.by ?? 'auth'}${notice.reason ? `: ${notice.reason}` : ''}.`;
    case 'factor_added':
      return `A second factor was added to your account (${notice.factor ?? 'unknown'}). Was this you?`;
  }
}

export function showNotices(client: Centrifuge, session: Session, list: HTMLElement): void {
  const user = session.user;
  if (!user) return;
  const subscription = client.newSubscription(`${NAMESPACE}:#${user}`);
  subscription.on('publication', (ctx) => {
    const notice = ctx.data as Notice;
    // This tab's own login is no news to it.
    if (notice.type === 'login' && notice.session?.id === session.claims.sid) return;
    const item = document.createElement('li');
    item.dataset.type = notice.type;
    item.textContent = describe(notice);
    const dismiss = document.createElement('button');
    dismiss.type = 'button';
    dismiss.textContent = '×';
    dismiss.title = 'Dismiss';
    dismiss.addEventListener('click', () => item.remove());
    item.append(dismiss);
    list.prepend(item);
    list.hidden = false;
  });
  subscription.subscribe();
}
