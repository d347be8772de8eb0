// Follows a channel over Tsunagu's /connection/uni_sse with the `eventsource` package (the WHATWG
// EventSource for Node), as a browser page would: one URL with the connect request in `cf_connect`,
// and the EventSource's own reconnects, which send the last event id back as Last-Event-ID.
// Prints one JSON line per thing that happens: {"type":"open"}, {"type":"push", push, lastEventId},
// {"type":"error"} (the stream ended: the EventSource reconnects by itself), and before each stream's
// events {"type":"encoding", value} (its Content-Encoding: fetch asks for gzip and decodes it). Runs
// until killed.
import { EventSource } from "eventsource";

const [url] = process.argv.slice(2);
const out = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const source = new EventSource(url, {
  fetch: async (input, init) => {
    const response = await fetch(input, init);
    out({ type: "encoding", value: response.headers.get("content-encoding") });
    return response;
  },
});
source.onopen = () => out({ type: "open" });
source.onerror = () => out({ type: "error", readyState: source.readyState });
source.onmessage = (event) => out({ type: "push", push: JSON.parse(event.data), lastEventId: event.lastEventId });
