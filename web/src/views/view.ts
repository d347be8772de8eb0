import type { Centrifuge } from 'centrifuge';

import type { WebConfig } from '../config';
import type { ServiceStatus } from '../services';
import type { Session } from '../session';

/** What every view gets: the configuration, the session, the shared connection and the service states. */
export interface AppContext {
  config: WebConfig;
  session: Session;
  services: ServiceStatus;
  client: Centrifuge;
  user: string;
}

export interface View {
  show?(): void;
  hide?(): void;
}

/** document.createElement with a class, a test id and text in one call. */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: { className?: string; testid?: string; text?: string } = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (props.className) node.className = props.className;
  if (props.testid) node.dataset.testid = props.testid;
  if (props.text !== undefined) node.textContent = props.text;
  node.append(...children);
  return node;
}

/** A stable color per user name (avatars, cursors, chat names). */
export function userColor(name: string): string {
  let hash = 0;
  for (const char of name) hash = (hash * 31 + char.codePointAt(0)!) >>> 0;
  return `hsl(${hash % 360} 70% 55%)`;
}
