'use strict';
// The client against an in-process grpc-js server with scripted answers (node --test): retries,
// PrefetchStates. No proxmo server needed; the real round trip is tests/deploy/test_node_client.py.
const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { ProxmoClient, ProxmoError, BuildError, loadProto } = require('../src/client');

const TRAJECTORIES = [{ trajectory_id: 'a', group_id: 'g', states: ['s0', 's1'], rewards: [0, 1] }];
const FAST = { backoffMs: 5, maxBackoffMs: 10 };

/** A server failing its first `failFirst` calls with `code`, recording every call. */
async function scriptedServer({ failFirst = 0, code = grpc.status.UNAVAILABLE, failWith = null } = {}) {
  const calls = [];
  const answer = (method, request, respond, callback) => {
    calls.push({ method, request });
    if (calls.length <= failFirst) return callback({ code, details: `scripted: ${code}` });
    if (failWith !== null) return callback({ code: failWith, details: 'scripted failure' });
    return callback(null, respond(request));
  };
  const handlers = {
    ComputeAdvantages: (call, cb) => answer('ComputeAdvantages', call.request,
      (r) => ({ request_id: r.request_id }), cb),
    PrefetchStates: (call, cb) => answer('PrefetchStates', call.request, (r) => {
      const distinct = new Set(r.states).size;
      return r.wait ? { distinct_states: distinct, cached_states: distinct }
        : { distinct_states: distinct, queued_states: distinct };
    }, cb),
    GetServerInfo: (call, cb) => answer('GetServerInfo', call.request, () => ({ version: 'node-test' }), cb),
  };
  const server = new grpc.Server();
  server.addService(loadProto().proto.CreditAssignmentService.service, handlers);
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(),
      (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  return { target: `127.0.0.1:${port}`, calls, stop: () => server.forceShutdown() };
}

async function withClient(serverOptions, clientOptions, fn) {
  const server = await scriptedServer(serverOptions);
  const client = new ProxmoClient(server.target, { ...FAST, ...clientOptions });
  try {
    return await fn(client, server.calls);
  } finally {
    client.close();
    server.stop();
  }
}

test('prefetchStates sends the texts and returns the counts', () => withClient({}, {}, async (client, calls) => {
  const queued = await client.prefetchStates(['s0', 's1', 's0']);
  assert.equal(queued.distinct_states, 2);
  assert.equal(queued.queued_states, 2);
  const waited = await client.prefetchStates(['s2'], { wait: true });
  assert.equal(waited.cached_states, 1);
  assert.deepEqual(calls.map((c) => [c.request.states, c.request.wait]), [[['s0', 's1', 's0'], false], [['s2'], true]]);
}));

test('prefetchStates names a non-string states[i] before sending', () => withClient({}, {}, async (client, calls) => {
  assert.throws(() => client.prefetchStates(['ok', 7]), (e) => e instanceof BuildError && e.field === 'states[1]');
  assert.throws(() => client.prefetchStates('text'), (e) => e instanceof BuildError && e.field === 'states');
  assert.throws(() => client.prefetchStates(['a'], { wait: 'yes' }), (e) => e instanceof BuildError && e.field === 'wait');
  assert.equal(calls.length, 0);
}));

for (const [name, code] of [['CANCELLED', grpc.status.CANCELLED], ['UNAVAILABLE', grpc.status.UNAVAILABLE]]) {
  test(`${name} from the server is retried with the same request_id`, () => withClient(
    { failFirst: 2, code }, { maxRetries: 2 }, async (client, calls) => {
      const response = await client.computeAdvantages(TRAJECTORIES, { requestId: 'fixed' });
      assert.equal(response.request_id, 'fixed');
      assert.deepEqual(calls.map((c) => c.request.request_id), ['fixed', 'fixed', 'fixed']);
      await client.prefetchStates(['s0']);
      await client.serverInfo();
    },
  ));

  test(`${name} is not retried past maxRetries`, () => withClient(
    { failFirst: 10, code }, { maxRetries: 2 }, async (client, calls) => {
      await assert.rejects(client.computeAdvantages(TRAJECTORIES, { requestId: 'fixed' }),
        (e) => e instanceof ProxmoError && e.codeName === name);
      assert.equal(calls.length, 3);
    },
  ));
}

test('other errors are not retried', () => withClient(
  { failWith: grpc.status.FAILED_PRECONDITION }, { maxRetries: 5 }, async (client, calls) => {
    await assert.rejects(client.prefetchStates(['s0']),
      (e) => e instanceof ProxmoError && e.codeName === 'FAILED_PRECONDITION');
    assert.equal(calls.length, 1);
  },
));

test('a closed client retries nothing', () => withClient(
  { failFirst: 100 }, { maxRetries: 5, backoffMs: 200, maxBackoffMs: 200 }, async (client, calls) => {
    const pending = client.serverInfo();
    while (calls.length === 0) await new Promise((resolve) => { setTimeout(resolve, 5); });
    client.close(); // during the back-off
    await assert.rejects(pending, (e) => e instanceof ProxmoError && e.codeName === 'UNAVAILABLE');
    await new Promise((resolve) => { setTimeout(resolve, 300); });
    assert.equal(calls.length, 1);
  },
));
