// What the WebRTC scripts share: Chromium with host candidates as addresses, and a page of a gateway's own
// origin (so the socket's Origin is one the gateway allows) holding the stock SDK and clients/js's WebRTC
// helpers as `window.modules` ({Centrifuge, PeerLink, DeviceControl}), as a web app would bundle them.
// The modules come from this script as blob URLs: a route intercepting requests makes Chromium drop the
// WebSocket.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);

export function launch(executablePath) {
  return chromium.launch({
    executablePath,
    // Host candidates as addresses, not mDNS names (nothing resolves .local names in a CI container).
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-features=WebRtcHideLocalIpsWithMdns'],
  });
}

// A page at `base` with the modules loaded; `helper` is a directory with clients/js built.
export async function webrtcPage(context, base, helper) {
  const sources = {
    centrifuge: readFileSync(join(require.resolve('centrifuge'), '..', 'index.mjs'), 'utf8'),
    webrtc: readFileSync(join(helper, 'webrtc.js'), 'utf8'),
    device: readFileSync(join(helper, 'device.js'), 'utf8'),
  };
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (error) => errors.push(String(error?.stack ?? error)));
  await page.goto(`${base}/healthz`);
  await page.evaluate(async (sources) => {
    const blob = (source) => URL.createObjectURL(new Blob([source], { type: 'text/javascript' }));
    const webrtcUrl = blob(sources.webrtc);
    const { PeerLink } = await import(webrtcUrl);
    // device.js imports ./webrtc.js: pointed at the same module.
    const { DeviceControl } = await import(blob(sources.device.replace("'./webrtc.js'", `'${webrtcUrl}'`)));
    const { Centrifuge } = await import(blob(sources.centrifuge));
    window.modules = { Centrifuge, PeerLink, DeviceControl };
  }, sources);
  return { page, errors };
}
