// A stock y-websocket client for tests/e2e/test_collab.py and bench/collab.py.
// usage: node y_client.mjs URL ROOM TOKEN LETTER COUNT EXPECT [TIMEOUT_S] [DELAY_MS]
// Inserts COUNT copies of LETTER at random positions of Y.Text "text" (one transaction each, DELAY_MS
// apart), then waits until the text is EXPECT characters long; prints {"text", "synced_ms", "done_ms"}.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const [url, room, token, letter, count, expect, timeoutS = '30', delayMs = '2'] = process.argv.slice(2)
const doc = new Y.Doc()
const text = doc.getText('text')
const started = Date.now()
const provider = new WebsocketProvider(url, room, doc, {
  WebSocketPolyfill: WebSocket,
  params: { token },
  disableBc: true,
})
provider.awareness.setLocalStateField('user', { name: letter })
let denied = ''
provider.on('connection-close', (event) => {
  if (event && event.code >= 4000) console.error(`closed ${event.code} ${event.reason}`)
})
const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: 'timeout', text: text.toString(), denied }))
  process.exit(2)
}, Number(timeoutS) * 1000)

const origWarn = console.warn
console.warn = (...args) => { denied = args.join(' '); origWarn(...args) }

await new Promise((resolve) => {
  if (provider.synced) resolve()
  provider.once('sync', (synced) => { if (synced) resolve() })
})
const syncedMs = Date.now() - started
console.error(`synced ${syncedMs}`)
const n = Number(count)
const delay = Number(delayMs)
for (let i = 0; i < n; i++) {
  const pos = Math.floor(Math.random() * (text.length + 1))
  text.insert(pos, letter)
  if (delay > 0) await new Promise((r) => setTimeout(r, delay))
}
const target = Number(expect)
await new Promise((resolve) => {
  const check = () => { if (text.length >= target) resolve() }
  text.observe(check)
  check()
})
// let our own last updates reach the server before leaving
await new Promise((r) => setTimeout(r, 300))
clearTimeout(timer)
console.log(JSON.stringify({ text: text.toString(), synced_ms: syncedMs, done_ms: Date.now() - started, denied }))
provider.destroy()
process.exit(0)
