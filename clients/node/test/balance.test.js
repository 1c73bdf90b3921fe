'use strict';
// Several targets: calls from one client spread round-robin over two in-process grpc-js servers.
const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { ProxmoClient, BuildError, channelTarget, loadProto } = require('../src/client');

async function countingServer() {
  const counter = { calls: 0 };
  const server = new grpc.Server();
  server.addService(loadProto().proto.CreditAssignmentService.service, {
    GetServerInfo: (call, cb) => { counter.calls += 1; cb(null, { version: 'balance-test' }); },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(),
      (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  return { address: `127.0.0.1:${port}`, counter, stop: () => server.forceShutdown() };
}

test('an array of targets balances calls round-robin over every server', async () => {
  const servers = [await countingServer(), await countingServer()];
  const client = new ProxmoClient(servers.map((s) => s.address), { backoffMs: 5 });
  try {
    for (let i = 0; i < 20; i += 1) await client.serverInfo();
    const counts = servers.map((s) => s.counter.calls);
    assert.equal(counts[0] + counts[1], 20);
    assert.ok(counts[0] >= 5 && counts[1] >= 5, `calls not spread: ${counts}`);
  } finally {
    client.close();
    servers.forEach((s) => s.stop());
  }
});

test('channelTarget: names need dns:///, families do not mix', () => {
  assert.deepEqual(channelTarget('localhost:1').options, {});
  assert.match(channelTarget('dns:///proxmo-grpc:50051').options['grpc.service_config'], /round_robin/);
  assert.equal(channelTarget(['127.0.0.1:1', '127.0.0.1:2']).target, 'ipv4:127.0.0.1:1,127.0.0.1:2');
  assert.throws(() => channelTarget(['proxmo:1', 'proxmo:2']), BuildError);
  assert.throws(() => channelTarget(['127.0.0.1:1', '[::1]:2']), BuildError);
  assert.throws(() => channelTarget([]), BuildError);
});
