// A Chromium page controls a device through clients/js DeviceControl: a data channel to the device agent,
// signaled over the platform, and the MQTT command path when the channel drops. It sends numbered commands
// at a steady pace and reports the paths it used.
//   node device_control.mjs '<json options>'
// options: {chromium, helper (clients/js built), base, user, token, device, commandTopic, commands, pauseMs}
// Prints one JSON line; exits 1 with the reason when a step fails.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const options = JSON.parse(process.argv[2]);
const require = createRequire(import.meta.url);
const sources = {
  centrifuge: readFileSync(join(require.resolve('centrifuge'), '..', 'index.mjs'), 'utf8'),
  webrtc: readFileSync(join(options.helper, 'webrtc.js'), 'utf8'),
  device: readFileSync(join(options.helper, 'device.js'), 'utf8'),
};

const browser = await chromium.launch({
  executablePath: options.chromium,
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-features=WebRtcHideLocalIpsWithMdns'],
});
let code = 0;
try {
  const page = await (await browser.newContext()).newPage();
  const errors = [];
  page.on('pageerror', (error) => errors.push(String(error?.stack ?? error)));
  // The gateway's own origin; the modules as blob URLs (see webrtc_call.mjs), device.js pointed at webrtc.js's.
  await page.goto(`${options.base}/healthz`);
  const result = await page.evaluate(async ({ sources, options }) => {
    const blob = (source) => URL.createObjectURL(new Blob([source], { type: 'text/javascript' }));
    const { Centrifuge } = await import(blob(sources.centrifuge));
    const webrtcUrl = blob(sources.webrtc);
    const { DeviceControl } = await import(blob(sources.device.replace("'./webrtc.js'", `'${webrtcUrl}'`)));
    const url = `${location.origin.replace(/^http/, 'ws')}/connection/websocket`;
    const client = new Centrifuge(url, { token: options.token });
    client.connect();
    const paths = [];
    const control = new DeviceControl({
      client,
      user: options.user,
      device: options.device,
      commandTopic: options.commandTopic,
      onPath: (path) => paths.push(path),
    });
    const deadline = Date.now() + 20_000;
    while (control.path !== 'webrtc') {
      if (control.path === 'mqtt' || Date.now() > deadline) return { error: `no data channel: ${paths}` };
      await new Promise((r) => setTimeout(r, 20));
    }
    const sent = [];
    for (let n = 1; n <= options.commands; n++) {
      sent.push([control.send({ n }), control.path]);
      await new Promise((r) => setTimeout(r, options.pauseMs));
    }
    // Until the gateway took every command sent over MQTT (the page must not close before).
    await control.sentOverMqtt();
    return { paths, sent, inFlightAtEnd: control.inFlight };
  }, { sources, options });
  if (result.error) throw new Error(result.error);
  console.log(JSON.stringify({ ...result, errors }));
} catch (error) {
  console.error(String(error?.stack ?? error));
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
