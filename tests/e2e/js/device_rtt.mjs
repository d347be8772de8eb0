// Command round trips from a Chromium page to the device agent and back, one at a time: over the WebRTC data
// channel (DeviceControl; the agent acknowledges on the channel), then over the platform's MQTT path (a publish
// to mqtt:<command topic> through the gateway, Kafka, mqtt-bridge and the broker; the agent acknowledges on
// its ack topic, which mqtt-bridge relays to mqtt:<ack topic>, which the page follows).
//   node device_rtt.mjs '<json options>'
// Meanwhile it times the agent's telemetry samples on arrival over both paths.
// options: {chromium, helper, base, user, token, device, commandTopic, ackTopic, telemetryTopic, rounds}
// Prints one JSON line {webrtc: [ms...], mqtt: [ms...], ages: {webrtc: [ms...], mqtt: [ms...]}}.
import { launch, webrtcPage } from './webrtc_page.mjs';

const options = JSON.parse(process.argv[2]);
const browser = await launch(options.chromium);
let code = 0;
try {
  const { page } = await webrtcPage(await browser.newContext(), options.base, options.helper);
  const result = await page.evaluate(async (options) => {
    const { Centrifuge, DeviceControl } = window.modules;
    const client = new Centrifuge(`${location.origin.replace(/^http/, 'ws')}/connection/websocket`, {
      token: options.token,
    });
    client.connect();
    const waiting = new Map();
    const settle = (id) => {
      const resolve = waiting.get(id);
      if (resolve) {
        waiting.delete(id);
        resolve(performance.now());
      }
    };
    const acks = client.newSubscription(`mqtt:${options.ackTopic}`);
    acks.on('publication', (ctx) => settle(ctx.data?.ack));
    acks.subscribe();
    await new Promise((resolve) => acks.once('subscribed', resolve));
    const control = new DeviceControl({ client, user: options.user, device: options.device, commandTopic: options.commandTopic });
    const channel = await control.link.open;
    channel.addEventListener('message', (event) => settle(JSON.parse(event.data).ack));
    const round = (send) =>
      new Promise((resolve) => {
        const started = performance.now();
        const id = send();
        waiting.set(id, (ended) => resolve(ended - started));
      });
    // Telemetry ages on arrival (the agent stamps each sample, same host clock), each sample by both paths.
    const ages = { webrtc: [], mqtt: [] };
    const telemetry = client.newSubscription(`mqtt:${options.telemetryTopic}`);
    telemetry.on('publication', (ctx) => {
      if (typeof ctx.data?.ts === 'number') ages.mqtt.push(Date.now() - ctx.data.ts);
    });
    telemetry.subscribe();
    channel.addEventListener('message', (event) => {
      const sample = JSON.parse(event.data).telemetry;
      if (typeof sample?.ts === 'number') ages.webrtc.push(Date.now() - sample.ts);
    });
    const timings = { webrtc: [], mqtt: [], ages };
    for (let n = 0; n < options.rounds; n++) timings.webrtc.push(await round(() => control.send({ n })));
    for (let n = 0; n < options.rounds; n++) {
      const id = `rtt-mqtt-${n}`;
      timings.mqtt.push(
        await round(() => {
          client.publish(`mqtt:${options.commandTopic}`, { id, payload: { n } });
          return id;
        }),
      );
    }
    return timings;
  }, options);
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(String(error?.stack ?? error));
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
