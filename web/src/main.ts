import './style.css';

import { authBase, loadConfig, type WebConfig } from './config';
import { connect, ENDED_KEY } from './connection';
import { showNotices } from './notices';
import { ServiceStatus } from './services';
import { Session } from './session';
import { showLogin } from './views/login';
import type { AppContext, View } from './views/view';

const ROUTES = ['chat', 'editor', 'board', 'world', 'device'] as const;
type Route = (typeof ROUTES)[number];

const $ = <T extends HTMLElement>(selector: string): T => document.querySelector<T>(selector)!;

function registerServiceWorker(): void {
  const ready = $('[data-testid="sw-ready"]');
  if (!('serviceWorker' in navigator)) {
    ready.textContent = 'offline: unsupported';
    return;
  }
  const mark = (): void => {
    if (!navigator.serviceWorker.controller) return;
    ready.dataset.ready = 'true';
    ready.textContent = 'offline: ready';
  };
  navigator.serviceWorker.addEventListener('controllerchange', mark);
  mark();
  // The dev server has no service worker; the built app does (/sw.js, skipWaiting + clientsClaim).
  if (import.meta.env.PROD) {
    navigator.serviceWorker.register('/sw.js', { scope: '/' }).catch((error: unknown) => {
      console.warn('service worker registration failed', error);
    });
  }
}

async function loadView(route: Route, context: AppContext): Promise<View> {
  const root = $(`#view-${route}`);
  switch (route) {
    case 'chat':
      return new (await import('./views/chat')).ChatView(root, context);
    case 'editor':
      return new (await import('./views/editor')).EditorView(root, context);
    case 'board':
      return new (await import('./views/board')).BoardView(root, context);
    case 'world':
      return new (await import('./views/world')).WorldView(root, context);
    case 'device':
      return new (await import('./views/device')).DeviceView(root, context);
  }
}

function startApp(config: WebConfig, session: Session, services: ServiceStatus): void {
  const user = session.user!;
  const client = connect(config, session, $('[data-testid="connection-state"]'));
  const context: AppContext = { config, session, services, client, user };
  showNotices(client, session, $('[data-testid="notices"]'));
  const views = new Map<Route, Promise<View>>();

  $('.nav').hidden = false;
  const whoami = $('.whoami');
  whoami.hidden = false;
  whoami.textContent = user;
  const logout = $('[data-testid="logout"]');
  logout.hidden = false;
  logout.addEventListener('click', () => session.logout());
  session.schedule();

  let active: Route | null = null;
  const route = async (): Promise<void> => {
    const name = location.hash.replace(/^#/, '');
    const next: Route = (ROUTES as readonly string[]).includes(name) ? (name as Route) : 'chat';
    if (next === active) return;
    const previous = active;
    active = next;
    for (const r of ROUTES) {
      $(`#view-${r}`).hidden = r !== next;
      $(`[data-testid="nav-${r}"]`).classList.toggle('active', r === next);
    }
    if (previous) void views.get(previous)?.then((view) => view.hide?.());
    if (!views.has(next)) views.set(next, loadView(next, context));
    const view = await views.get(next)!;
    if (active === next) view.show?.();
  };
  window.addEventListener('hashchange', () => void route());
  void route();
}

async function main(): Promise<void> {
  registerServiceWorker();
  const services = new ServiceStatus($('ul.services'));
  services.start();
  let config: WebConfig;
  try {
    config = await loadConfig();
  } catch (error) {
    $('.boot').textContent = `The gateway is not reachable and this browser has no saved configuration (${String(error)}).`;
    return;
  }
  $('.boot').remove();
  const session = new Session(authBase(config));
  let appUser: string | null = null;
  const start = (): void => {
    appUser = session.user;
    $('.login').hidden = true;
    startApp(config, session, services);
  };
  session.onChange((next) => {
    if (appUser === null && next) start();
    // Logged out (here, in another tab, or a refused refresh) or another user logged in elsewhere:
    // start again from a clean page.
    else if (appUser !== null && next?.user !== appUser) location.reload();
  });
  if (session.loggedIn) start();
  else {
    showLogin($('.login'), session);
    const ended = sessionStorage.getItem(ENDED_KEY);
    if (ended) {
      sessionStorage.removeItem(ENDED_KEY);
      const error = $('[data-testid="login-error"]');
      error.dataset.state = 'ended';
      error.textContent = `Your session was ended (${ended}): log in again.`;
    }
  }
}

void main();
