// Calls Health and Status on an inferd server using LocalAI's backend.proto, from Node.
// Usage: node client.js HOST:PORT PROTO_PATH [API_KEY]
// Prints one JSON object: {"health": "...", "state": "...", "memoryTotal": N}
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [addr, protoPath, apiKey] = process.argv.slice(2);
const def = protoLoader.loadSync(protoPath, { keepCase: true, longs: String, enums: String, defaults: true });
const backend = grpc.loadPackageDefinition(def).backend;
const client = new backend.Backend(addr, grpc.credentials.createInsecure());
const md = new grpc.Metadata();
if (apiKey) md.add("authorization", `Bearer ${apiKey}`);
const deadline = () => new Date(Date.now() + 10000);

client.Health({}, md, { deadline: deadline() }, (err, reply) => {
  if (err) { console.error(`Health failed: ${err.code} ${err.details}`); process.exit(1); }
  client.Status({}, md, { deadline: deadline() }, (err2, status) => {
    if (err2) { console.error(`Status failed: ${err2.code} ${err2.details}`); process.exit(1); }
    console.log(JSON.stringify({
      health: Buffer.from(reply.message).toString("utf8"),
      state: status.state,
      memoryTotal: Number(status.memory.total),
    }));
    client.close();
  });
});
