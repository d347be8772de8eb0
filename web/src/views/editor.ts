/** Editor: one shared Yjs document over the gateway's y-websocket endpoint, bound to CodeMirror 6 with
 * remote cursors and selections from awareness. */

import { EditorView as CodeMirror, basicSetup } from 'codemirror';
import { EditorState } from '@codemirror/state';
import { keymap } from '@codemirror/view';
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next';
import { WebsocketProvider } from 'y-websocket';
import * as Y from 'yjs';

import { wsUrl } from '../config';
import { serviceBanner } from '../services';
import { el, userColor, type AppContext, type View } from './view';

const TOKEN_SYNC_MS = 15000;

/** CodeMirror's own look is light; this matches the app's dark palette (style.css), gutter included. */
const darkTheme = CodeMirror.theme(
  {
    '&': { color: '#e2e8f0', backgroundColor: '#0b1220' },
    '.cm-content': { caretColor: '#e2e8f0' },
    '.cm-cursor, .cm-dropCursor': { borderLeftColor: '#e2e8f0' },
    '.cm-gutters': { backgroundColor: '#0b1220', color: '#64748b', borderRight: '1px solid #1e293b' },
    '.cm-activeLineGutter': { backgroundColor: '#111c33', color: '#94a3b8' },
    '.cm-activeLine': { backgroundColor: 'rgb(56 189 248 / 0.06)' },
    '&.cm-focused > .cm-scroller > .cm-selectionLayer .cm-selectionBackground, .cm-selectionBackground, .cm-content ::selection':
      { backgroundColor: '#1e3a5f' },
    '.cm-selectionMatch': { backgroundColor: 'rgb(56 189 248 / 0.15)' },
    '&.cm-focused .cm-matchingBracket': { backgroundColor: 'rgb(56 189 248 / 0.25)', outline: 'none' },
    '.cm-panels': { backgroundColor: '#111c33', color: '#e2e8f0' },
    '.cm-panels.cm-panels-top': { borderBottom: '1px solid #1e293b' },
    '.cm-panels.cm-panels-bottom': { borderTop: '1px solid #1e293b' },
    '.cm-tooltip': { backgroundColor: '#111c33', color: '#e2e8f0', border: '1px solid #1e293b' },
    '.cm-foldPlaceholder': { backgroundColor: '#1e293b', color: '#94a3b8', border: 'none' },
  },
  { dark: true },
);

export class EditorView implements View {
  private readonly provider: WebsocketProvider;

  constructor(root: HTMLElement, context: AppContext) {
    const { config, session, services, user } = context;
    const status = el('span', { className: 'status', testid: 'editor-status', text: 'connecting' });
    const peers = el('span', { className: 'peers' });
    const container = el('div', { className: 'editor', testid: 'editor' });
    root.append(
      el(
        'div',
        { className: 'panel editor-panel' },
        el('h2', { text: `Document “${config.editor_doc}”` }),
        serviceBanner(services, ['collab'], 'edits reach the others online but are not saved.'),
        el('p', { className: 'meta' }, status, ' · ', peers),
        container,
      ),
    );

    const doc = new Y.Doc();
    const provider = new WebsocketProvider(wsUrl(config.collab_path), config.editor_doc, doc, {
      params: { token: session.accessToken ?? '' },
      // An expired token closes the socket; the next attempt carries the refreshed one.
      shouldReconnect: () => session.loggedIn,
    });
    this.provider = provider;
    const syncToken = (): void => {
      session
        .token()
        .then((token) => {
          provider.params = { ...provider.params, token };
        })
        .catch(() => {
          // Offline or logged out: the session handles it.
        });
    };
    provider.on('connection-close', syncToken);
    window.setInterval(syncToken, TOKEN_SYNC_MS);

    const color = userColor(user);
    provider.awareness.setLocalStateField('user', { name: user, color, colorLight: color.replace(')', ' / 0.25)') });
    provider.on('status', ({ status: s }) => {
      status.textContent = s === 'connected' && provider.synced ? 'synced' : s;
      status.dataset.state = s;
    });
    provider.on('sync', (synced) => {
      if (synced) status.textContent = 'synced';
    });
    const renderPeers = (): void => {
      const names = [...provider.awareness.getStates().values()]
        .map((state) => (state as { user?: { name?: string } }).user?.name)
        .filter((name): name is string => Boolean(name));
      peers.textContent = `editing: ${[...new Set(names)].sort().join(', ') || user}`;
    };
    provider.awareness.on('change', renderPeers);
    renderPeers();

    const ytext = doc.getText('content');
    const undoManager = new Y.UndoManager(ytext);
    new CodeMirror({
      parent: container,
      state: EditorState.create({
        doc: ytext.toString(),
        extensions: [
          keymap.of(yUndoManagerKeymap),
          basicSetup,
          darkTheme,
          CodeMirror.lineWrapping,
          yCollab(ytext, provider.awareness, { undoManager }),
        ],
      }),
    });
    window.addEventListener('pagehide', () => provider.awareness.setLocalState(null));
  }

  show(): void {
    if (!this.provider.shouldConnect) this.provider.connect();
  }
}
