// A stock @hocuspocus/provider client for tests/e2e/test_collab.py: one HocuspocusProviderWebsocket and one
// HocuspocusProvider per document, all over one WebSocket.
// usage: node hocuspocus_client.mjs URL TOKEN DOCS DENIED LETTER COUNT EXPECT [TIMEOUT_S] [DELAY_MS]
// DOCS and DENIED are comma-separated names (DENIED: documents the server must refuse; "-" for none).
// Waits until every DOCS document is synced and every DENIED one refused, then inserts COUNT copies of
// LETTER at random positions of Y.Text "text" of each DOCS document, waits until each is EXPECT characters
// long and all its updates are stored (no unsynced changes; a read-only document: its length only); prints
// {"texts", "unsynced", "denied", "scopes", "sockets", "closes", "synced_ms", "done_ms"}.
import { HocuspocusProvider, HocuspocusProviderWebsocket } from '@hocuspocus/provider'
import WebSocket from 'ws'
import * as Y from 'yjs'

const [url, token, docsArg, deniedArg, letter, count, expect, timeoutS = '30', delayMs = '2'] = process.argv.slice(2)
const names = docsArg.split(',')
const refusedNames = deniedArg === '-' ? [] : deniedArg.split(',')
const started = Date.now()

// Counts the WebSockets the provider opens: all documents must share one.
let sockets = 0
class CountingWebSocket extends WebSocket {
  constructor (...args) {
    super(...args)
    sockets += 1
  }
}

const closes = []
const socket = new HocuspocusProviderWebsocket({
  url,
  WebSocketPolyfill: CountingWebSocket,
  onClose: ({ event }) => closes.push(`${event.code} ${event.reason}`),
})
const denied = {}
const scopes = {}
const providers = {}
for (const name of [...names, ...refusedNames]) {
  providers[name] = new HocuspocusProvider({
    websocketProvider: socket,
    name,
    token,
    broadcast: false,
    onAuthenticationFailed: ({ reason }) => { denied[name] = reason },
    onAuthenticated: () => { scopes[name] = providers[name].authorizedScope },
  })
  providers[name].setAwarenessField('user', { name: letter })
}
const texts = () => Object.fromEntries(names.map((name) => [name, providers[name].document.getText('text').toString()]))
const timer = setTimeout(() => {
  const unsynced = Object.fromEntries(names.map((name) => [name, providers[name].unsyncedChanges]))
  console.log(JSON.stringify({ error: 'timeout', texts: texts(), unsynced, denied, scopes, sockets, closes }))
  process.exit(2)
}, Number(timeoutS) * 1000)

const until = (check) => new Promise((resolve) => {
  const poll = () => (check() ? resolve() : setTimeout(poll, 10))
  poll()
})
await until(() => names.every((name) => providers[name].synced) && refusedNames.every((name) => name in denied))
const syncedMs = Date.now() - started
console.error(`synced ${syncedMs}`)

const n = Number(count)
const delay = Number(delayMs)
for (let i = 0; i < n; i++) {
  for (const name of names) {
    const text = providers[name].document.getText('text')
    text.insert(Math.floor(Math.random() * (text.length + 1)), letter)
  }
  if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay))
}
const target = Number(expect)
await until(() => names.every((name) => {
  const provider = providers[name]
  // a read-only document never stores this client's updates: its text is enough
  const stored = !provider.hasUnsyncedChanges || provider.authorizedScope === 'readonly'
  return provider.document.getText('text').length >= target && stored
}))
const unsynced = Object.fromEntries(names.map((name) => [name, providers[name].unsyncedChanges]))
clearTimeout(timer)
console.log(JSON.stringify({ texts: texts(), unsynced, denied, scopes, sockets, closes, synced_ms: syncedMs, done_ms: Date.now() - started }))
for (const provider of Object.values(providers)) provider.destroy()
socket.destroy()
process.exit(0)
