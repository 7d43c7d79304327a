// Socket.IO with the Redis adapter: a peer the hub's fan-out benchmarks compare
// against. It persists nothing: a "push" event from a connection is emitted, as
// it came, to the other connections of the same user, on this process and (via
// Redis pub/sub) on every other process of the same Redis.
//
// The user comes from the handshake (the `user` query parameter, or `user` in
// the auth payload); each connection joins its user's room. WebSocket transport
// only, no compression, so it runs the same wire path as the hub and the relays.
//
//   node server.js [--port 0] [--redis redis://127.0.0.1:6379/0] [--ping-interval-ms 25000]
//
// prints "peer: listening on http://127.0.0.1:PORT" when it is ready.
"use strict";

const http = require("node:http");
const { parseArgs } = require("node:util");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const { values } = parseArgs({
    options: {
      host: { type: "string", default: "127.0.0.1" },
      port: { type: "string", default: "0" },
      redis: { type: "string", default: "redis://127.0.0.1:6379/0" },
      "ping-interval-ms": { type: "string", default: "25000" }, // Socket.IO's default
    },
  });
  const pub = createClient({ url: values.redis });
  const sub = pub.duplicate();
  for (const client of [pub, sub]) {
    client.on("error", (err) => console.error("peer: redis:", err.message));
  }
  await Promise.all([pub.connect(), sub.connect()]);

  const server = http.createServer();
  const io = new Server(server, {
    transports: ["websocket"],
    perMessageDeflate: false,
    serveClient: false,
    maxHttpBufferSize: 1 << 20,
    pingInterval: Number(values["ping-interval-ms"]),
    adapter: createAdapter(pub, sub),
  });
  io.on("connection", (socket) => {
    const user = String(socket.handshake.query.user || socket.handshake.auth.user || "");
    socket.join(user);
    socket.on("push", (message) => {
      socket.to(user).emit("push", message); // to the user's room, except the sender
    });
  });

  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);

  server.listen(Number(values.port), values.host, () => {
    const { port } = server.address();
    console.log(`peer: listening on http://${values.host}:${port}`);
  });
}

main().catch((err) => {
  console.error("peer:", err);
  process.exit(1);
});
