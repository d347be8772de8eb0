// An HTTP proxy in front of gateways, as a corporate proxy or a load balancer without sticky sessions:
// it passes plain HTTP requests through (streamed both ways: a long response is forwarded as it comes)
// and answers every WebSocket Upgrade with 403, as a proxy that does not allow WebSockets does.
// `/emulation` requests may go to another gateway than everything else (a balancer that spreads them).
//   node refusing_proxy.mjs <listen port> <gateway host:port> [<emulation gateway host:port>]
// Prints one JSON line {"listening": port}, then one per request: {"method", "path", "to", "status"}.
import http from 'node:http';

const [listenPort, target, emulationTarget = target] = process.argv.slice(2);
const out = (line) => process.stdout.write(JSON.stringify(line) + '\n');

function upstream(path) {
  const [host, port] = (path.startsWith('/emulation') ? emulationTarget : target).split(':');
  return { host, port: Number(port) };
}

const server = http.createServer((request, response) => {
  const to = upstream(request.url);
  // The Host header is passed as it came: to the gateway the page is of its own origin.
  const forwarded = http.request(
    { ...to, method: request.method, path: request.url, headers: request.headers },
    (answer) => {
      out({ method: request.method, path: request.url.split('?')[0], to: `${to.host}:${to.port}`, status: answer.statusCode });
      response.writeHead(answer.statusCode, answer.headers);
      response.flushHeaders();
      answer.pipe(response);
    },
  );
  forwarded.on('error', () => response.destroy());
  response.on('close', () => forwarded.destroy());
  request.pipe(forwarded);
});

server.on('upgrade', (request, socket) => {
  out({ method: 'UPGRADE', path: request.url.split('?')[0], status: 403 });
  socket.end('HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 26\r\nConnection: close\r\n\r\nWebSockets are not allowed');
});

server.listen(Number(listenPort), '127.0.0.1', () => out({ listening: Number(listenPort) }));
process.on('SIGTERM', () => process.exit(0));
