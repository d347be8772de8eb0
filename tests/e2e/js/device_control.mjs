// A Chromium page controls a device through clients/js DeviceControl: a data channel to the device agent,
// signaled over the platform, and the MQTT command path when the channel drops. It sends numbered commands
// at a steady pace and reports the paths it used.
//   node device_control.mjs '<json options>'
// options: {chromium, helper (clients/js built), base, user, token, device, commandTopic, commands, pauseMs}
// Prints one JSON line; exits 1 with the reason when a step fails.
import { launch, webrtcPage } from './webrtc_page.mjs';

const options = JSON.parse(process.argv[2]);
const browser = await launch(options.chromium);
let code = 0;
try {
  const { page, errors } = await webrtcPage(await browser.newContext(), options.base, options.helper);
  const result = await page.evaluate(async (options) => {
    const { Centrifuge, DeviceControl } = window.modules;
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
  }, options);
  if (result.error) throw new Error(result.error);
  console.log(JSON.stringify({ ...result, errors }));
} catch (error) {
  console.error(String(error?.stack ?? error));
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
