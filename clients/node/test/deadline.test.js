'use strict';
// The default deadline of a batch the server must encode (node --test): sized from the
// encoder rate GetServerInfo reports, only for ENCODER batches of >= 1,000 distinct states.
// The real round trip (a proxmo server encoding a cold batch) is tests/encoder/test_deadlines.py.
const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { ProxmoClient, encoderDeadlineMs, loadProto } = require('../src/client');

const INFO = {
  default_preset: 'proxmo',
  default_similarity: 'SIMILARITY_ENCODER',
  presets: [
    { name: 'proxmo', config: { similarity: 'SIMILARITY_ENCODER' } },
    { name: 'grpo', config: {} },
  ],
  encoder: { backend: 'torch-cpu', states_per_second: 200 },
};

function trajectories(distinct) {
  const out = [];
  for (let i = 0; i < distinct; i += 50) {
    const states = Array.from({ length: Math.min(50, distinct - i) }, (_, t) => `state ${i + t}`);
    out.push({ trajectory_id: `t${i}`, group_id: 'g', states, rewards: states.map(() => 0) });
  }
  return out;
}

function request(distinct, config = {}) {
  return { trajectories: trajectories(distinct).map((t) => ({ steps: t.states.map((state) => ({ state })) })), config };
}

test('encoderDeadlineMs adds twice the encoding time of the distinct states to the default', () => {
  assert.equal(encoderDeadlineMs(request(2000), INFO, 30000), 30000 + 2 * 10 * 1000);
  assert.equal(encoderDeadlineMs(request(2000, { similarity: 'SIMILARITY_TFIDF' }), INFO, 30000), 30000);
  assert.equal(encoderDeadlineMs(request(2000, { preset: 'grpo' }), INFO, 30000), 30000);
  assert.equal(encoderDeadlineMs(request(2000), { ...INFO, encoder: { states_per_second: 0 } }, 30000), 30000);
  assert.equal(encoderDeadlineMs(request(2000), null, 30000), 30000);
});

test('a big ENCODER batch gets the derived deadline; a small one costs no extra call', async () => {
  const calls = [];
  const handlers = {
    GetServerInfo: (call, cb) => { calls.push(['GetServerInfo']); cb(null, INFO); },
    ComputeAdvantages: (call, cb) => {
      calls.push(['ComputeAdvantages', call.getDeadline()]);
      cb(null, { request_id: call.request.request_id });
    },
  };
  const server = new grpc.Server();
  server.addService(loadProto().proto.CreditAssignmentService.service, handlers);
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(),
      (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  const client = new ProxmoClient(`127.0.0.1:${port}`, { timeoutMs: 30000 });
  try {
    const started = Date.now();
    await client.computeAdvantages(trajectories(10));
    await client.computeAdvantages(trajectories(2000));
    await client.computeAdvantages(trajectories(2000)); // the rate is cached
    assert.deepEqual(calls.map((c) => c[0]),
      ['ComputeAdvantages', 'GetServerInfo', 'ComputeAdvantages', 'ComputeAdvantages']);
    const elapsed = Date.now() - started; // the deadlines were set within this time
    const small = new Date(calls[0][1]).getTime() - started;
    const big = new Date(calls[2][1]).getTime() - started;
    assert.ok(small >= 29000 && small <= 30000 + elapsed, `small batch deadline ${small} ms`);
    assert.ok(big >= 49000 && big <= 50000 + elapsed, `big batch deadline ${big} ms`);
  } finally {
    client.close();
    server.forceShutdown();
  }
});
