// Two Chromium pages open a WebRTC data channel through the platform's signaling (clients/js PeerLink on the
// stock centrifuge SDK), each page on its own gateway; then the caller sends numbered messages over it.
//   node webrtc_call.mjs '<json options>'
// options: {chromium, helper (a directory with clients/js built), call,
//           parties: [{user, token, base}, {user, token, base}], messages, iceServers, iceTransportPolicy}
// Prints one JSON line: what each page saw; exits 1 with the reason when a step fails.
import { launch, webrtcPage } from './webrtc_page.mjs';

const options = JSON.parse(process.argv[2]);

// One party: a page with the SDK and the helper, as a web app would bundle them, and a PeerLink to the peer.
async function party(browser, { user, token, base }, peer) {
  const context = await browser.newContext();
  const { page, errors } = await webrtcPage(context, base, options.helper);
  await page.evaluate(
    async ({ user, peer, token, call, iceServers, iceTransportPolicy }) => {
      const { Centrifuge, PeerLink } = window.modules;
      const url = `${location.origin.replace(/^http/, 'ws')}/connection/websocket`;
      const client = new Centrifuge(url, { token });
      client.connect();
      window.log = [];
      client.on('connected', () => window.log.push('connected'));
      client.on('disconnected', (ctx) => window.log.push(`disconnected ${ctx.code} ${ctx.reason}`));
      client.on('connecting', (ctx) => window.log.push(`connecting ${ctx.code} ${ctx.reason}`));
      client.on('error', (ctx) => window.log.push(`error ${JSON.stringify(ctx.error)}`));
      const link = new PeerLink({ client, call, user, peer, iceServers, iceTransportPolicy });
      const sub = client.getSubscription(link.channelName);
      sub.on('publication', (ctx) => window.log.push(`${ctx.info?.user}: ${ctx.data?.type}`));
      sub.on('subscribed', () => window.log.push('subscribed'));
      sub.on('error', (ctx) => window.log.push(`sub error ${JSON.stringify(ctx.error)}`));
      sub.on('unsubscribed', (ctx) => window.log.push(`unsubscribed ${ctx.code} ${ctx.reason}`));
      window.received = [];
      window.link = link;
      window.opened = link.open.then((channel) => {
        channel.onmessage = (event) => window.received.push(event.data);
        window.channel = channel;
        return true;
      });
    },
    { user, peer, token, call: options.call, iceServers: options.iceServers ?? [], iceTransportPolicy: options.iceTransportPolicy ?? 'all' },
  );
  return { context, page, errors };
}

const browser = await launch(options.chromium);
let code = 0;
try {
  const [a, b] = options.parties;
  const caller = await party(browser, a, b.user);
  const callee = await party(browser, b, a.user);
  const timeout = 20_000;
  const state = (side) =>
    side.page.evaluate(() => ({
      log: window.log,
      signaling: window.link.connection.signalingState,
      ice: window.link.connection.iceConnectionState,
      connection: window.link.connection.connectionState,
    }));
  for (const side of [caller, callee]) {
    const opened = side.page.evaluate(() => window.opened);
    const late = new Promise((_, reject) => setTimeout(() => reject(new Error('late')), timeout));
    try {
      await Promise.race([opened, late]);
    } catch {
      throw new Error(`no data channel: caller ${JSON.stringify(await state(caller))} callee ${JSON.stringify(await state(callee))}`);
    }
  }
  await caller.page.evaluate((count) => {
    for (let n = 0; n < count; n++) window.channel.send(JSON.stringify({ n }));
  }, options.messages);
  await callee.page.waitForFunction((count) => window.received.length >= count, options.messages, { timeout });
  const result = {
    received: await callee.page.evaluate(() => window.received.map((m) => JSON.parse(m).n)),
    pair: await caller.page.evaluate(async () => {
      // The candidate pair the data channel runs on: host, or relay through TURN.
      const stats = await window.link.connection.getStats();
      let selected;
      stats.forEach((report) => {
        if (report.type === 'transport' && report.selectedCandidatePairId) selected = report.selectedCandidatePairId;
      });
      const pair = selected ? stats.get(selected) : undefined;
      const local = pair ? stats.get(pair.localCandidateId) : undefined;
      return { local: local?.candidateType ?? null };
    }),
    ignored: [await caller.page.evaluate(() => window.link.ignored), await callee.page.evaluate(() => window.link.ignored)],
    errors: [...caller.errors, ...callee.errors],
  };
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(String(error?.stack ?? error));
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
