// The stock centrifuge-js SDK in Chromium (through playwright-core), each client given its list of
// transports as a web app gives it, in a page of `base`'s origin (the SDK as a blob module: a route
// intercepting requests would make Chromium drop WebSockets).
//   node emulation_chat.mjs '<JSON config>'
// config: {base, chromium, channel, mode: "chat"|"follow", clients: [{name, token, transports, publish}],
//          count?, timeout?, protobuf?} (protobuf: the SDK's protobuf build, payloads JSON text as bytes)
// chat: every client subscribes; then each publishes its `publish` messages ({from, n}, one after the
//   other, awaiting each reply) while the others do the same; ends once every client received all of
//   them. follow: one client subscribes recoverable and positioned, prints {"ready": true} at its first
//   `subscribed`, and ends once it received `count` publications (the test publishes, restarts...).
// Prints one JSON summary line: per client the transport it connected with, what it received in order,
// its `subscribed` events and disconnect codes; and the page's errors.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);
const config = JSON.parse(process.argv[2]);
const out = (line) => process.stdout.write(JSON.stringify(line) + '\n');

const browser = await chromium.launch({ executablePath: config.chromium, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
const page = await browser.newPage();
const errors = [];
page.on('pageerror', (error) => errors.push(String(error?.stack ?? error)));
await page.exposeFunction('report', (line) => out(line));
await page.goto(`${config.base}/healthz`);
const build = config.protobuf ? join('protobuf', 'index.mjs') : 'index.mjs';
const sdk = readFileSync(join(require.resolve('centrifuge'), '..', build), 'utf8');

const summary = await page.evaluate(
  async ({ sdk, config }) => {
    const { Centrifuge } = await import(URL.createObjectURL(new Blob([sdk], { type: 'text/javascript' })));
    const timeout = (config.timeout ?? 30) * 1000;
    const encode = (value) => (config.protobuf ? new TextEncoder().encode(JSON.stringify(value)) : value);
    const decode = (data) => (config.protobuf ? JSON.parse(new TextDecoder().decode(data)) : data);
    const expected = config.mode === 'follow' ? config.count : config.clients.reduce((sum, c) => sum + (c.publish ?? 0), 0);
    const states = config.clients.map((spec) => {
      const client = new Centrifuge(spec.transports, {
        token: spec.token,
        emulationEndpoint: spec.emulationEndpoint ?? `${config.base}/emulation`,
        minReconnectDelay: 100,
        maxReconnectDelay: 1000,
      });
      const state = { name: spec.name, client, transports: [], received: [], subscribed: [], disconnects: [], errors: [] };
      client.on('connected', (ctx) => state.transports.push(ctx.transport));
      client.on('connecting', (ctx) => ctx.code !== 0 && state.disconnects.push(ctx.code));
      client.on('disconnected', (ctx) => state.disconnects.push(ctx.code));
      client.on('error', (ctx) => state.errors.push(`${ctx.type}: ${ctx.error?.message ?? ''} (${ctx.transport ?? ''})`));
      const options = config.mode === 'follow' ? { recoverable: true, positioned: true } : {};
      state.sub = client.newSubscription(config.channel, options);
      state.done = new Promise((resolve) => {
        state.sub.on('publication', (ctx) => {
          state.received.push({ ...decode(ctx.data), offset: Number(ctx.offset ?? 0) });
          if (state.received.length >= expected) resolve();
        });
      });
      state.ready = new Promise((resolve) => {
        state.sub.on('subscribed', (ctx) => {
          state.subscribed.push({ recovered: ctx.recovered, wasRecovering: ctx.wasRecovering });
          if (state.subscribed.length === 1 && config.mode === 'follow') window.report({ ready: true });
          resolve();
        });
      });
      state.sub.subscribe();
      client.connect();
      return state;
    });
    const deadline = new Promise((_, reject) => setTimeout(() => reject(new Error('timed out')), timeout));
    let failure = null;
    try {
      await Promise.race([Promise.all(states.map((s) => s.ready)), deadline]);
      if (config.mode === 'chat') {
        await Promise.race([
          Promise.all(
            states.map(async (state, index) => {
              for (let n = 0; n < (config.clients[index].publish ?? 0); n++) {
                await state.sub.publish(encode({ from: state.name, n }));
              }
            }),
          ),
          deadline,
        ]);
      }
      await Promise.race([Promise.all(states.map((s) => s.done)), deadline]);
    } catch (error) {
      failure = String(error);
    }
    // Taken before the clients disconnect (their own `disconnected` events are not the run's).
    const result = JSON.parse(JSON.stringify({
      failure,
      clients: states.map(({ name, transports, received, subscribed, disconnects, errors }) => ({
        name, transports, received, subscribed, disconnects, errors,
      })),
    }));
    for (const state of states) state.client.disconnect();
    return result;
  },
  { sdk, config },
);
out({ summary: { ...summary, pageErrors: errors } });
await browser.close();
