// The demo web app driven in real Chromium (Debian's, through playwright-core), one scenario per run:
//   node browser_demo.mjs <scenario> '<json options>'
// options: {base, chromium, artifacts, room, users: {alice: pw, bob: pw}}
// Prints one JSON line with what it observed; exits 1 with the reason when an expectation fails.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

import { LossyProxy } from './lossy_proxy.mjs';

const [scenario, raw] = process.argv.slice(2);
const options = JSON.parse(raw);
mkdirSync(options.artifacts, { recursive: true });

const STEP_TIMEOUT = 20_000;

function fail(message) {
  throw new Error(`${scenario}: ${message}`);
}

// The app's page at `base` in a fresh browser context, not logged in; page errors are collected.
async function visit(browser, base = options.base, path = '/') {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  return { context, ...(await tab(context, base, path)) };
}

// Another page of `context` (same origin: same storage, same session, if any), at `path`.
async function tab(context, base = options.base, path = '/') {
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  const errors = [];
  page.on('pageerror', (error) => errors.push(String(error?.stack ?? error)));
  await page.goto(base + path);
  return { page, errors };
}

async function open(browser, user, base = options.base, path = '/') {
  const { context, page, errors } = await visit(browser, base, path);
  await page.getByTestId('login-user').fill(user);
  await page.getByTestId('login-password').fill(options.users[user]);
  await page.getByTestId('login-submit').click();
  await connected(page);
  return { context, page, errors, user };
}

async function connected(page) {
  await page.waitForFunction(
    () => document.querySelector('[data-testid="connection-state"]')?.textContent?.trim() === 'connected',
    null,
    { timeout: STEP_TIMEOUT },
  );
}

async function shot(page, name) {
  const path = join(options.artifacts, `${name}.png`);
  await page.screenshot({ path });
  return path;
}

async function chatTexts(page) {
  return page.$$eval('[data-testid="chat-log"] li', (items) =>
    items.map((li) => li.querySelector('.text')?.textContent ?? ''),
  );
}

async function pendingCount(page) {
  return Number((await page.getByTestId('chat-pending').textContent())?.trim());
}

// Polls `check` until it returns true; what it returned last, or true.
async function poll(check, timeout) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last === true) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return last;
}

async function waitFor(what, check, timeout = STEP_TIMEOUT) {
  const last = await poll(check, timeout);
  if (last !== true) fail(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

async function enterChat(page) {
  await page.getByTestId('nav-chat').click();
  await page.getByTestId(`chat-room-${options.room}`).click();
}

async function send(page, text) {
  await page.getByTestId('chat-input').fill(text);
  await page.getByTestId('chat-input').press('Enter');
}

async function connectionState(page) {
  return (await page.getByTestId('connection-state').textContent())?.trim();
}

// What bob's room shows of `texts` (in the order shown) once it holds as many, and after a second
// more, in which a late double would arrive; then the same from the room's history, after a reload.
async function seenByBob(b, belongs, count) {
  const mine = async () => (await chatTexts(b.page)).filter(belongs);
  await waitFor(`bob to see all ${count}`, async () => ((await mine()).length >= count ? true : await mine()), 30_000);
  await new Promise((r) => setTimeout(r, 1000));
  const live = await mine();
  await b.page.reload();
  await connected(b.page);
  await b.page.getByTestId(`chat-room-${options.room}`).click();
  await waitFor('bob\'s history after a reload', async () => ((await mine()).length >= count ? true : await mine()));
  return { live, history: await mine() };
}

async function chatOffline(browser) {
  const room = options.room;
  const a = await open(browser, 'alice');
  const b = await open(browser, 'bob');
  for (const side of [a, b]) await enterChat(side.page);
  // The app must load from the service worker after a reload while offline.
  await a.page.waitForSelector('[data-testid="sw-ready"][data-ready="true"]', { state: 'attached' });

  await a.context.setOffline(true);
  await waitFor('alice to notice she is offline', async () => ((await connectionState(a.page)) !== 'connected' ? true : 'connected'));
  const sent = Array.from({ length: 20 }, (_, n) => `offline message ${n + 1} ${room}`);
  for (const text of sent) await send(a.page, text);
  await waitFor('20 queued publications', async () => ((await pendingCount(a.page)) === 20 ? true : await pendingCount(a.page)));
  const offlineShot = await shot(a.page, 'chat-offline-queue');

  await a.page.reload();
  await a.page.getByTestId('chat-pending').waitFor();
  await waitFor('the queue to survive the reload', async () =>
    (await pendingCount(a.page)) === 20 ? true : await pendingCount(a.page),
  );
  const stillOffline = await connectionState(a.page);

  await a.context.setOffline(false);
  await connected(a.page);
  await waitFor('the queue to drain', async () => ((await pendingCount(a.page)) === 0 ? true : await pendingCount(a.page)), 30_000);

  const mine = (text) => text.endsWith(` ${room}`);
  const bob = await seenByBob(b, mine, 20);
  const aliceSees = (await chatTexts(a.page)).filter(mine);
  const screenshots = [offlineShot, await shot(a.page, 'chat-alice'), await shot(b.page, 'chat-bob')];
  return { sent, bobSaw: bob.live, aliceSees, bobHistory: bob.history, stillOffline, errors: [...a.errors, ...b.errors], screenshots };
}

// Alice through a LossyProxy (listening on options.proxy_port), bob straight to the gateway, both in
// the chat room; `run(proxy, alice, bob)` does the rest. The proxy closes whatever happens.
async function throughProxy(browser, run) {
  const proxy = await LossyProxy.start(options.proxy_port, options.base);
  try {
    const alice = await open(browser, 'alice', proxy.base);
    const bob = await open(browser, 'bob');
    for (const side of [alice, bob]) await enterChat(side.page);
    return await run(proxy, alice, bob);
  } finally {
    await proxy.close();
  }
}

// Another tab of alice's (logged in: it shares the first tab's storage), connected, on `view`.
async function aliceTab(alice, base, view = 'chat') {
  const other = { ...(await tab(alice.context, base, `/#${view}`)), context: alice.context };
  await connected(other.page);
  if (view === 'chat') await enterChat(other.page);
  return other;
}

const FLUSH_LOCK = 'tsunagu-outbox-alice:flush';

// The clients holding and waiting for the outbox's flush lock (the lock manager is the origin's: all tabs).
async function flushLock(page) {
  return page.evaluate(async (name) => {
    const all = await navigator.locks.query();
    const ours = (list) => list.filter((lock) => lock.name === name).map((lock) => lock.clientId);
    return { held: ours(all.held), waiting: ours(all.pending) };
  }, FLUSH_LOCK);
}

async function drained(page, what) {
  await waitFor(what, async () => ((await pendingCount(page)) === 0 ? true : await pendingCount(page)), 30_000);
}

// What bob saw of the messages starting with `tag` (live, then from history), and their publishes on the wire.
async function delivered(proxy, tag, bob, count) {
  const seen = await seenByBob(bob, (text) => text.startsWith(tag), count);
  return { bobSaw: seen.live, bobHistory: seen.history, publishes: proxy.publishes.filter((p) => p.text?.startsWith(tag)) };
}

// The proxy loses the gateway's reply to alice's second message together with her connection, after the
// gateway applied it: her outbox, never told, resends it once she is reconnected, and bob must see it
// once, between the first and the third.
function outboxLostAck(browser) {
  return throughProxy(browser, async (proxy, a, b) => {
    const tag = `lost ack ${options.room} #`;
    const sent = [1, 2, 3].map((n) => `${tag}${n}`);
    proxy.loseReplyTo((publish) => publish.text === sent[1]);
    for (const text of sent) await send(a.page, text);
    await drained(a.page, 'alice\'s queue to drain');
    return {
      sent,
      ...(await delivered(proxy, tag, b, sent.length)),
      aliceSees: (await chatTexts(a.page)).filter((text) => text.startsWith(tag)),
      errors: [...a.errors, ...b.errors],
      screenshots: [await shot(a.page, 'outbox-lost-ack-alice'), await shot(b.page, 'outbox-lost-ack-bob')],
    };
  });
}

// Two tabs of alice's (one context: one origin, one IndexedDB outbox) both queue messages offline, then
// come back at once. The proxy holds the gateway's first reply until both tabs are connected and one
// waits for the other's flush lock, so both want to send at the same moment: the Web Lock must leave it
// to one of them (without it both send the first message).
function outboxTwoTabs(browser) {
  return throughProxy(browser, async (proxy, one, b) => {
    const tag = `two tabs ${options.room} `;
    const two = await aliceTab(one, proxy.base);
    await one.context.setOffline(true);
    for (const side of [one, two]) {
      await waitFor('alice\'s tabs to notice they are offline', async () => ((await connectionState(side.page)) !== 'connected' ? true : 'connected'));
    }
    const sent = { one: [], two: [] };
    for (let n = 1; n <= 6; n++) {
      for (const [name, side] of [['one', one], ['two', two]]) {
        const text = `${tag}${name} #${n}`;
        await send(side.page, text);
        sent[name].push(text);
      }
    }
    const total = sent.one.length + sent.two.length;
    for (const side of [one, two]) {
      await waitFor(`both tabs to show the ${total} queued`, async () => ((await pendingCount(side.page)) === total ? true : await pendingCount(side.page)));
    }
    const offlineShot = await shot(two.page, 'outbox-two-tabs-queued');

    const release = proxy.holdReplies();
    await one.context.setOffline(false);
    for (const side of [one, two]) await connected(side.page);
    const onTheWire = () => proxy.publishes.filter((p) => p.text?.startsWith(tag)).length;
    let locks;
    // Until a first message is out and the other tab waits for the lock (with no lock: 5 s, by which
    // time both tabs have sent it).
    await poll(async () => {
      locks = await flushLock(one.page);
      return onTheWire() > 0 && locks.held.length > 0 && locks.waiting.length > 0 ? true : locks;
    }, 5000);
    const inFlightWhileHeld = onTheWire();
    release();
    for (const side of [one, two]) await drained(side.page, 'the shared queue to drain');
    return {
      sent,
      ...(await delivered(proxy, tag, b, total)),
      locks,
      inFlightWhileHeld,
      errors: [...one.errors, ...two.errors, ...b.errors],
      screenshots: [offlineShot, await shot(b.page, 'outbox-two-tabs-bob')],
    };
  });
}

// Alice's tab crashes with her first message on the wire, its reply held back by the proxy: the gateway
// applied it, the tab never heard. Her other tab, on the Board until then, opens the chat (and so the
// outbox) meanwhile and waits for the flush lock; it gets it when the crashed tab's locks go with it,
// resends what the outbox still holds (the first message with its key), and bob sees each once, in order.
function outboxCrashedTab(browser) {
  return throughProxy(browser, async (proxy, one, b) => {
    const tag = `crashed tab ${options.room} #`;
    const sent = [1, 2, 3].map((n) => `${tag}${n}`);
    // Open before the reply is held: the SDK gives up on a reply after 5 s and would resend by itself.
    const two = await aliceTab(one, proxy.base, 'board');
    const release = proxy.holdReplies();
    for (const text of sent) await send(one.page, text);
    const onTheWire = () => proxy.publishes.filter((p) => p.text?.startsWith(tag)).length;
    await waitFor('the first message on the wire', async () => onTheWire() > 0 || onTheWire());
    await enterChat(two.page);
    await waitFor('the other tab to wait for the flush lock', async () => {
      const locks = await flushLock(two.page);
      return locks.waiting.length > 0 || locks;
    });
    const crashed = new Promise((resolve) => one.page.once('crash', resolve));
    const devtools = await one.context.newCDPSession(one.page);
    devtools.send('Page.crash').catch(() => {}); // never answered: the renderer is gone
    await crashed;
    await waitFor('the crashed tab\'s connection to close', async () => proxy.open === 1 || proxy.open);
    release();
    await drained(two.page, 'the other tab to send what the crashed one left');
    return {
      sent,
      ...(await delivered(proxy, tag, b, sent.length)),
      twoSees: (await chatTexts(two.page)).filter((text) => text.startsWith(tag)),
      errors: [...one.errors, ...two.errors, ...b.errors],
      screenshots: [await shot(two.page, 'outbox-crashed-tab-other'), await shot(b.page, 'outbox-crashed-tab-bob')],
    };
  });
}

// The document's text: the lines without the remote carets' name labels (widgets inside .cm-content).
async function editorText(page) {
  return page.$$eval('[data-testid="editor"] .cm-content .cm-line', (lines) =>
    lines
      .map((line) => {
        const copy = line.cloneNode(true);
        for (const widget of copy.querySelectorAll('.cm-ySelectionCaret, .cm-ySelectionInfo, .cm-widgetBuffer')) widget.remove();
        return copy.textContent.replace(/[\u200b\u2060]/g, '');
      })
      .join('\n'),
  );
}

async function editorConverges(browser) {
  const a = await open(browser, 'alice');
  const b = await open(browser, 'bob');
  for (const side of [a, b]) {
    await side.page.getByTestId('nav-editor').click();
    await side.page.locator('[data-testid="editor"] .cm-content').waitFor();
  }
  // y-websocket has synced when the editor is editable and both see the same (possibly empty) text.
  await waitFor('both editors synced', async () => (await editorText(a.page)) === (await editorText(b.page)) || 'differ');
  const marker = options.room;
  await a.page.locator('[data-testid="editor"] .cm-content').click();
  await b.page.locator('[data-testid="editor"] .cm-content').click();
  await Promise.all([
    a.page.keyboard.type(` alpha-${marker} one two three`, { delay: 15 }),
    b.page.keyboard.type(` beta-${marker} four five six`, { delay: 15 }),
  ]);
  await waitFor('the editors to converge', async () => {
    const [ta, tb] = [await editorText(a.page), await editorText(b.page)];
    return ta === tb && ta.includes(`alpha-${marker} one two three`) && ta.includes(`beta-${marker} four five six`)
      ? true
      : { alice: ta.slice(-120), bob: tb.slice(-120) };
  });
  const remoteCursors = await a.page.locator('[data-testid="editor"] .cm-ySelectionCaret').count();
  const screenshots = [await shot(a.page, 'editor-alice'), await shot(b.page, 'editor-bob')];
  return { alice: await editorText(a.page), bob: await editorText(b.page), remoteCursors, errors: [...a.errors, ...b.errors], screenshots };
}

async function boardUpdates(browser) {
  const a = await open(browser, 'alice');
  await a.page.getByTestId('nav-board').click();
  const symbol = options.symbol;
  const price = () => a.page.getByTestId(`board-price-${symbol}`).textContent();
  await waitFor('a first price', async () => (Number.parseFloat((await price()) ?? '') > 0 ? true : await price()));
  const first = (await price())?.trim();
  await waitFor('the price to change', async () => ((await price())?.trim() !== first ? true : first));
  const second = (await price())?.trim();
  await waitFor('device telemetry in the IoT panel', async () => {
    const text = (await a.page.getByTestId('iot-log').textContent()) ?? '';
    return text.includes(options.iot_marker) ? true : text.slice(-80);
  });
  const status = {};
  for (const name of ['stream-ingest', 'mqtt-bridge', 'sim-engine', 'collab']) {
    status[name] = (await a.page.getByTestId(`service-status-${name}`).first().textContent())?.trim();
  }
  return { first, second, status, errors: a.errors, screenshots: [await shot(a.page, 'board')] };
}

async function entities(page) {
  return page.$$eval('[data-testid="world-entities"] li', (items) =>
    items.map((li) => ({ id: li.dataset.entity, x: Number(li.dataset.x), y: Number(li.dataset.y) })),
  );
}

async function worldMoves(browser) {
  const a = await open(browser, 'alice');
  const b = await open(browser, 'bob');
  for (const side of [a, b]) {
    await side.page.getByTestId('nav-world').click();
    await side.page.getByTestId('world-canvas').waitFor();
  }
  // Both avatars join when the view opens, before any key press; then alice watches bob move right.
  let joined;
  await waitFor('both avatars on join, with no key pressed', async () => {
    const ids = (await entities(a.page)).map((e) => e.id);
    joined = ids;
    return ids.includes('alice') && ids.includes('bob') ? true : ids;
  });
  await b.page.getByTestId('world-canvas').click();
  await b.page.keyboard.press('ArrowUp');
  let bobId;
  await waitFor('bob in alice\'s world', async () => {
    const found = (await entities(a.page)).find((e) => e.id.includes('bob'));
    bobId = found?.id;
    return found ? true : await entities(a.page);
  });
  const before = (await entities(a.page)).find((e) => e.id === bobId);
  for (let n = 0; n < 8; n++) {
    await b.page.keyboard.press('ArrowRight');
    await new Promise((r) => setTimeout(r, 60));
  }
  await waitFor('bob to move right in alice\'s world', async () => {
    const now = (await entities(a.page)).find((e) => e.id === bobId);
    return now && now.x > before.x + 3 ? true : now;
  });
  const after = (await entities(a.page)).find((e) => e.id === bobId);
  const screenshots = [await shot(a.page, 'world-alice'), await shot(b.page, 'world-bob')];
  return { joined, bobId, before, after, errors: [...a.errors, ...b.errors], screenshots };
}

// A digital twin room in the World view (`?world=<room>`): the devices and their readings as telemetry
// arrives, and a command sent from the page's form, whose receipt comes back to it.
async function twinCommand(browser) {
  const a = await open(browser, 'alice', options.base, `/?world=${options.twinRoom}`);
  await a.page.getByTestId('nav-world').click();
  await waitFor('the twin panel, once the room shows devices', async () =>
    (await a.page.getByTestId('twin-panel').count()) > 0
      ? true
      : `${await a.page.textContent('.world-panel h2')} ${await a.page.textContent('.world-panel .meta')}`,
  );
  let rover;
  await waitFor('the rover live, at its reported position', async () => {
    rover = await a.page.$eval('[data-testid="world-entities"] li[data-entity="rover"]', (li) => ({
      x: Number(li.dataset.x),
      y: Number(li.dataset.y),
      stale: li.dataset.stale,
      text: li.textContent,
    })).catch(() => null);
    return rover && rover.stale === 'false' && rover.text.includes(options.marker) ? true : rover;
  });
  await a.page.getByTestId('twin-device').selectOption('rover');
  await a.page.getByTestId('twin-payload').fill(JSON.stringify({ drive: options.marker }));
  await a.page.getByTestId('twin-send').click();
  let receipt;
  await waitFor('the command receipt', async () => {
    receipt = await a.page.$$eval('[data-testid="twin-receipts"] li', (items) =>
      items.map((li) => ({ state: li.dataset.state, text: li.textContent })),
    );
    return receipt.some((line) => line.state === 'delivered') ? true : receipt;
  });
  return { rover, receipt, errors: a.errors, screenshots: [await shot(a.page, 'world-twin')] };
}

// `tsunagu run` with nothing configured: the demo device's telemetry on the Board, and a setpoint sent
// from the Board's device panel answered by the device itself (MQTT 5 request/response).
async function deviceCommand(browser) {
  const a = await open(browser, 'alice');
  await a.page.getByTestId('nav-board').click();
  await waitFor('the demo device telemetry', async () => {
    const text = (await a.page.getByTestId('iot-log').textContent()) ?? '';
    return text.includes('demo-thermostat') && text.includes('temperature') ? true : text.slice(-80);
  });
  const telemetry = await a.page.$$eval('[data-testid="iot-log"] li', (items) => items.length);
  await waitFor('the device state', async () => {
    const text = (await a.page.getByTestId('device-state').textContent()) ?? '';
    return text.includes('setpoint') ? true : text;
  });
  const setpoint = options.setpoint;
  await a.page.getByTestId('device-setpoint').fill(String(setpoint));
  await a.page.getByTestId('device-send').click();
  const answer = a.page.getByTestId('device-answer');
  await waitFor('the device to answer', async () =>
    (await answer.getAttribute('data-state')) !== 'pending' ? true : await answer.textContent(),
  );
  const answered = { state: await answer.getAttribute('data-state'), text: (await answer.textContent())?.trim() };
  await waitFor('the device state channel to show the new setpoint', async () => {
    const text = (await a.page.getByTestId('device-state').textContent()) ?? '';
    return text.includes(`setpoint ${setpoint.toFixed(1)} °C`) ? true : text;
  });
  const state = (await a.page.getByTestId('device-state').textContent())?.trim();
  const banner = await a.page.getByTestId('banner-mqtt-bridge').isVisible();
  const status = {};
  for (const name of ['auth', 'collab', 'stream-ingest', 'mqtt-bridge', 'sim-engine']) {
    status[name] = (await a.page.getByTestId(`service-status-${name}`).first().textContent())?.trim();
  }
  return { telemetry, answered, state, banner, status, errors: a.errors, screenshots: [await shot(a.page, 'board-device')] };
}

// The Device view: a device agent called over a WebRTC data channel, its telemetry and a command
// acknowledged over it; then the channel dropped from the page: the view shows the MQTT path, telemetry keeps
// coming over MQTT and a command is acknowledged over MQTT; called again, the data channel is back.
// options.device names the device to pick.
async function rtcDevice(browser) {
  const a = await open(browser, 'alice');
  await a.page.getByTestId('nav-device').click();
  await a.page.getByTestId('dv-pick').selectOption(options.device);
  const path = a.page.getByTestId('dv-path');
  const sample = a.page.getByTestId('dv-sample');
  await waitFor('the data channel', async () =>
    (await path.getAttribute('data-path')) === 'webrtc' ? true : await path.textContent(),
  );
  const samples = async () => ({ path: await sample.getAttribute('data-path'), seq: Number(await sample.getAttribute('data-seq')) });
  await waitFor('telemetry over the data channel', async () => ((await samples()).path === 'webrtc' ? true : await sample.textContent()));
  const overChannel = await samples();
  const fields = await a.page.$$eval('[data-testid="dv-telemetry"] dd', (items) =>
    Object.fromEntries(items.map((dd) => [dd.dataset.field, dd.textContent])),
  );
  const command = async (payload) => {
    await a.page.getByTestId('dv-payload').fill(JSON.stringify(payload));
    await a.page.getByTestId('dv-send').click();
    const row = a.page.locator('[data-testid="dv-commands"] li').first();
    await waitFor(`the acknowledgement of ${JSON.stringify(payload)}`, async () =>
      (await row.getAttribute('data-state')) === 'acked' ? true : await row.textContent(),
    );
    return { id: await row.getAttribute('data-id'), path: await row.getAttribute('data-path'), text: (await row.textContent())?.trim() };
  };
  const first = await command({ speed: 1, marker: options.marker });
  const shots = [await shot(a.page, 'device-webrtc')];
  await a.page.getByTestId('dv-drop').click();
  await waitFor('the MQTT path', async () =>
    (await path.getAttribute('data-path')) === 'mqtt' ? true : await path.textContent(),
  );
  const pathText = (await path.textContent())?.trim();
  await waitFor('telemetry over MQTT', async () => {
    const now = await samples();
    return now.path === 'mqtt' && now.seq > overChannel.seq ? true : await sample.textContent();
  });
  const overMqtt = await samples();
  const second = await command({ turn: 90, marker: options.marker });
  shots.push(await shot(a.page, 'device-mqtt'));
  // Calling again brings the data channel back (a new call on the same signaling channel).
  await a.page.getByTestId('dv-call').click();
  await waitFor('the data channel again', async () =>
    (await path.getAttribute('data-path')) === 'webrtc' ? true : await path.textContent(),
  );
  const third = await command({ stop: true, marker: options.marker });
  return { overChannel, fields, first, pathText, overMqtt, second, third, errors: a.errors, screenshots: shots };
}

// The app told which transport to use (`?transport=<name>`): alice chats over it, bob over WebSocket, and
// each sees the other's message; the connection indicator names the transport.
async function transportChat(browser) {
  const a = await open(browser, 'alice', options.base, `/?transport=${options.transport}`);
  const b = await open(browser, 'bob');
  const transport = await a.page.getByTestId('connection-state').getAttribute('data-transport');
  await enterChat(a.page);
  await enterChat(b.page);
  const fromAlice = `over ${options.transport} ${Date.now()}`;
  const fromBob = `to ${options.transport} ${Date.now()}`;
  await send(a.page, fromAlice);
  await waitFor('bob to see alice\'s message', async () => ((await chatTexts(b.page)).includes(fromAlice) ? true : await chatTexts(b.page)));
  await send(b.page, fromBob);
  await waitFor('alice to see bob\'s message', async () => ((await chatTexts(a.page)).includes(fromBob) ? true : await chatTexts(a.page)));
  return { transport, errors: [...a.errors, ...b.errors], screenshots: [await shot(a.page, `chat-${options.transport}`)] };
}

// A user who failed too often is told the login is locked and for how long, not that auth is unreachable.
async function loginLocked(browser) {
  const { page, errors } = await visit(browser);
  const message = page.getByTestId('login-error');
  const messages = [];
  for (let attempt = 0; attempt <= options.max_failures; attempt++) {
    await page.getByTestId('login-user').fill(options.user);
    await page.getByTestId('login-password').fill('not the password');
    await page.getByTestId('login-submit').click();
    await waitFor(`the answer to attempt ${attempt + 1}`, async () => ((await message.textContent())?.trim() ? true : 'empty'));
    messages.push((await message.textContent()).trim());
  }
  return { messages, errors, screenshots: [await shot(page, 'login-locked')] };
}

// A backend publishes to a chat room through the server API with only `{text}`: the room shows it
// from "server", at the time it arrived.
async function chatFromServer(browser) {
  const a = await open(browser, 'alice');
  await a.page.getByTestId('nav-chat').click();
  await a.page.getByTestId(`chat-room-${options.room}`).click();
  await a.page.waitForFunction(() => document.querySelector('.chat-main h2')?.textContent?.startsWith('#'));
  // The subscription must stand before the publication, or it only comes from history.
  await new Promise((r) => setTimeout(r, 1000));
  const text = `from a backend ${Date.now()}`;
  const response = await fetch(`${options.base}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': options.api_key },
    body: JSON.stringify({ channel: `chat:${options.room}`, data: { text } }),
  });
  if (!response.ok) fail(`server API publish: HTTP ${response.status} ${await response.text()}`);
  let shown;
  await waitFor('the backend message in the room', async () => {
    shown = await a.page.$$eval(
      '[data-testid="chat-log"] li',
      (items, wanted) =>
        items
          .filter((li) => li.querySelector('.text')?.textContent === wanted)
          .map((li) => ({ user: li.querySelector('.user')?.textContent, time: li.querySelector('time')?.textContent, server: li.classList.contains('from-server') })),
      text,
    );
    return shown.length ? true : 'not yet';
  });
  return { shown: shown[0], errors: a.errors, screenshots: [await shot(a.page, 'chat-server')] };
}

// The platform lost its MQTT broker: the Board says what mqtt-bridge is missing, not that it is not running.
async function missingBroker(browser) {
  const a = await open(browser, 'alice');
  await a.page.getByTestId('nav-board').click();
  const banner = a.page.getByTestId('banner-mqtt-bridge');
  await waitFor('the banner naming the missing broker', async () => {
    const text = (await banner.isVisible()) ? ((await banner.textContent()) ?? '') : 'hidden';
    return text.includes('cannot reach') ? true : text;
  }, 30_000);
  const status = (await a.page.getByTestId('service-status-mqtt-bridge').textContent())?.trim();
  return { banner: (await banner.textContent()).trim(), status, errors: a.errors, screenshots: [await shot(a.page, 'board-no-broker')] };
}

async function storedSession(page) {
  return page.evaluate(() => JSON.parse(localStorage.getItem('tsunagu.session') ?? 'null'));
}

function claims(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
}

// The platform issues short-lived access tokens here (TSUNAGU_AUTH_ACCESS_TOKEN_TTL): the app must
// refresh before expiry and keep its connection, then publish with the new token.
async function sessionRefresh(browser) {
  const a = await open(browser, 'alice');
  const states = [];
  await a.page.exposeFunction('recordState', (state) => states.push(state));
  await a.page.evaluate(() => {
    const indicator = document.querySelector('[data-testid="connection-state"]');
    new MutationObserver(() => window.recordState(indicator.textContent.trim())).observe(indicator, {
      childList: true,
      characterData: true,
      subtree: true,
    });
  });
  const first = await storedSession(a.page);
  const expiresAt = claims(first.access_token).exp * 1000;
  const lifetime = expiresAt - Date.now();
  await waitFor('a refreshed access token', async () => {
    const now = await storedSession(a.page);
    return now.access_token !== first.access_token ? true : 'not yet';
  }, lifetime + 10_000);
  const refreshedAt = Date.now();
  const second = await storedSession(a.page);
  // Past the first token's expiry: the connection must still stand (the SDK sent the new token).
  await new Promise((r) => setTimeout(r, Math.max(0, expiresAt - Date.now()) + 3000));
  const state = (await a.page.getByTestId('connection-state').textContent())?.trim();
  await a.page.getByTestId('nav-chat').click();
  await a.page.getByTestId(`chat-room-${options.room}`).click();
  const text = `after refresh ${options.room}`;
  await a.page.getByTestId('chat-input').fill(text);
  await a.page.getByTestId('chat-input').press('Enter');
  await waitFor('the message sent with the refreshed token', async () => {
    const texts = await chatTexts(a.page);
    return (await pendingCount(a.page)) === 0 && texts.includes(text) ? true : texts.slice(-3);
  });
  return {
    refreshedBeforeExpiry: refreshedAt < expiresAt,
    sameUser: claims(second.access_token).sub === 'alice',
    newRefreshToken: second.refresh_token !== first.refresh_token,
    stateAfterExpiry: state,
    states,
    errors: a.errors,
    screenshots: [],
  };
}

// The operator console: an admin logs in with a password and a TOTP code, sees bob's two sessions (two
// browsers) with their connections, ends one; that tab is logged out, bob's other browser shows the
// "session ended" notice, and the console's live audit feed shows the admin's login and the revocation,
// with the chain verified. options: {admin: {user, password, otp}}
async function operatorConsole(browser) {
  const laptop = await open(browser, 'bob');
  const phone = await open(browser, 'bob');
  const sidOf = (page) =>
    page.evaluate(() => {
      const token = JSON.parse(localStorage.getItem('tsunagu.session')).access_token;
      return JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).sid;
    });
  const [laptopSid, phoneSid] = [await sidOf(laptop.page), await sidOf(phone.page)];

  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const { page, errors } = await tab(context, options.base, '/console');
  await page.getByTestId('login-user').fill(options.admin.user);
  await page.getByTestId('login-password').fill(options.admin.password);
  await page.getByTestId('login-submit').click();
  await page.getByTestId('login-otp').waitFor({ state: 'visible' });
  const asked = (await page.getByTestId('login-error').textContent()).trim();
  await page.getByTestId('login-otp').fill(options.admin.otp);
  await page.getByTestId('login-submit').click();
  await page.getByTestId('console').waitFor({ state: 'visible' });
  const whoami = (await page.getByTestId('console-whoami').textContent()).trim();

  const bobRows = () =>
    page.$$eval('[data-testid="session-row"][data-user="bob"]', (rows) =>
      rows.map((row) => ({
        id: row.dataset.session,
        connections: Number(row.querySelector('[data-testid="session-connections"]').textContent),
        device: row.cells[1].textContent,
        gateways: row.cells[6].textContent,
      })),
    );
  await waitFor('bob\'s two sessions, connected', async () => {
    const rows = (await bobRows()).filter((r) => r.id === laptopSid || r.id === phoneSid);
    return rows.length === 2 && rows.every((r) => r.connections >= 1) ? true : rows;
  });
  const before = await bobRows();
  const shots = [await shot(page, 'console-sessions')];

  await page.locator(`[data-testid="session-row"][data-session="${laptopSid}"] [data-testid="end-session"]`).click();
  await laptop.page.getByTestId('login-submit').waitFor({ state: 'visible', timeout: 15_000 });
  const laptopMessage = (await laptop.page.getByTestId('login-error').textContent()).trim();
  const notice = phone.page.locator('[data-testid="notices"] li[data-type="session_ended"]');
  await notice.first().waitFor({ state: 'visible', timeout: 15_000 });
  const phoneNotice = (await notice.first().textContent()).trim();
  shots.push(await shot(phone.page, 'console-notice'));
  await waitFor('the ended session to leave the list', async () => {
    const ids = (await bobRows()).map((r) => r.id);
    return !ids.includes(laptopSid) && ids.includes(phoneSid) ? true : ids;
  });

  const feed = () =>
    page.$$eval('[data-testid="audit-item"]', (items) =>
      items.map((li) => ({ action: li.dataset.action, actor: li.dataset.actor, subject: li.dataset.subject, outcome: li.dataset.outcome })),
    );
  await waitFor('the login and the revocation in the audit feed', async () => {
    const items = await feed();
    const login = items.some((i) => i.action === 'auth.login' && i.subject === options.admin.user && i.outcome === 'ok');
    const revoke = items.some((i) => i.action === 'auth.revoke' && i.actor === options.admin.user && i.subject === 'bob');
    return login && revoke ? true : items.slice(0, 8);
  });
  await page.getByTestId('audit-verify-button').click();
  await waitFor('the chain verified', async () =>
    (await page.getByTestId('audit-verify').getAttribute('data-state')) === 'ok' ? true : await page.getByTestId('audit-verify').textContent(),
  );
  const verified = (await page.getByTestId('audit-verify').textContent()).trim();
  await waitFor('the verification in the audit feed', async () =>
    (await feed()).some((i) => i.action === 'auth.console.audit_verify') ? true : 'not yet',
  );
  // The channel inspector: who is in bob's room, then a message to it, which bob's phone shows.
  await page.getByTestId('inspector-channel').fill(`chat:${options.room}`);
  await page.getByTestId('inspector-presence').click();
  const result = page.getByTestId('inspector-result');
  await waitFor('the room\'s presence', async () => ((await result.textContent()).includes('"bob"') ? true : await result.textContent()));
  const presence = JSON.parse(await result.textContent());
  const text = `from the console ${Date.now()}`;
  await page.getByTestId('inspector-data').fill(JSON.stringify({ text }));
  await page.getByTestId('inspector-publish').click();
  await waitFor('bob\'s phone to show the console\'s message', async () => ((await chatTexts(phone.page)).includes(text) ? true : await chatTexts(phone.page)));
  await waitFor('the inspector\'s actions in the audit feed', async () => {
    const actions = (await feed()).map((i) => i.action);
    return actions.includes('auth.console.presence') && actions.includes('auth.console.publish') ? true : actions.slice(0, 6);
  });
  shots.push(await shot(page, 'console-audit'));
  return {
    presence,
    asked,
    whoami,
    before,
    laptopSid,
    phoneSid,
    laptopMessage,
    phoneNotice,
    verified,
    feed: (await feed()).slice(0, 20),
    errors: [...errors, ...laptop.errors, ...phone.errors],
    screenshots: shots,
  };
}

const scenarios = {
  session: sessionRefresh,
  'chat-offline': chatOffline,
  'outbox-lost-ack': outboxLostAck,
  'outbox-two-tabs': outboxTwoTabs,
  'outbox-crashed-tab': outboxCrashedTab,
  editor: editorConverges,
  board: boardUpdates,
  world: worldMoves,
  twin: twinCommand,
  device: deviceCommand,
  'rtc-device': rtcDevice,
  transport: transportChat,
  'login-locked': loginLocked,
  'chat-server': chatFromServer,
  'missing-broker': missingBroker,
  console: operatorConsole,
};

const browser = await chromium.launch({
  executablePath: options.chromium,
  // Root in CI containers has no user namespaces for the sandbox.
  // Host candidates as addresses, not mDNS names, for the Device view's WebRTC (nothing resolves .local here).
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-features=WebRtcHideLocalIpsWithMdns'],
});
let code = 0;
try {
  const result = await scenarios[scenario](browser);
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(String(error?.stack ?? error));
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
