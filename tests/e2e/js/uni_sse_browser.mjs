// Follows a channel over Tsunagu's /connection/uni_sse with Chromium's own EventSource (through
// playwright-core), in a page of the gateway's origin: what a web page does with no SDK. Prints the same
// JSON lines as uni_sse_follower.mjs ({"type":"open"|"push"|"error"|"encoding", ...}) until killed.
//   node uni_sse_browser.mjs <uni_sse URL with cf_connect> <chromium path>
import { chromium } from 'playwright-core';

const [url, executablePath] = process.argv.slice(2);
const out = (line) => process.stdout.write(JSON.stringify(line) + '\n');
const browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
const page = await browser.newPage();
await page.exposeFunction('report', (line) => out(line));
// The stream's Content-Encoding, as Chromium received it (it asks for gzip and decodes it itself).
page.on('response', (response) => {
  if (response.url().includes('/connection/uni_sse'))
    out({ type: 'encoding', value: response.headers()['content-encoding'] ?? null });
});
await page.goto(new URL('/healthz', url).href);
await page.evaluate((url) => {
  const source = new EventSource(url);
  source.onopen = () => window.report({ type: 'open' });
  source.onerror = () => window.report({ type: 'error', readyState: source.readyState });
  source.onmessage = (event) =>
    window.report({ type: 'push', push: JSON.parse(event.data), lastEventId: event.lastEventId });
}, url);
process.on('SIGTERM', async () => {
  await browser.close();
  process.exit(0);
});
await new Promise(() => {});
