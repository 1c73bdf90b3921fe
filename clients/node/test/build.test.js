'use strict';
// Request building and validation, no server (node --test). The server round trip is tested
// from pytest (tests/deploy/test_node_client.py), against the Python client's numbers.
const test = require('node:test');
const assert = require('node:assert/strict');
const { buildRequest, buildConfig, BuildError } = require('../src/client');

const good = () => [
  { trajectory_id: 'a', group_id: 'g', states: ['s0', 's1'], rewards: [0, 1], invalid: [false, true] },
  { trajectory_id: 'b', group_id: 'g', task_id: 'task', states: ['s0'], rewards: [0], success: false },
];

test('builds a request with proto field names', () => {
  const request = buildRequest(good(), { preset: 'gigpo', requestId: 'r1', dryRun: true, config: { gamma: 0.9 } });
  assert.equal(request.request_id, 'r1');
  assert.equal(request.dry_run, true);
  assert.deepEqual(request.config, { preset: 'gigpo', gamma: 0.9 });
  assert.deepEqual(request.trajectories[0].steps[1], { state: 's1', reward: 1, invalid_action: true });
  assert.equal(request.trajectories[1].task_id, 'task');
  assert.equal(request.trajectories[1].success, false);
});

test('a fresh uuid request_id when none is given', () => {
  const a = buildRequest(good()).request_id;
  const b = buildRequest(good()).request_id;
  assert.match(a, /^[0-9a-f-]{36}$/);
  assert.notEqual(a, b);
});

test('enum config values by short or full name', () => {
  assert.equal(buildConfig('', { similarity: 'exact' }).similarity, 'SIMILARITY_EXACT');
  assert.equal(buildConfig('', { success_rate_source: 'SUCCESS_RATE_SOURCE_BATCH' }).success_rate_source,
    'SUCCESS_RATE_SOURCE_BATCH');
  assert.equal(buildConfig('', { episode_normalization: 'mean-std' }).episode_normalization, 'NORMALIZATION_MEAN_STD');
});

test('HGPO and GraphGPO options: booleans, a non-negative integer K, numbers', () => {
  const config = buildConfig('hgpo', { hgpo_history_length: 0, hgpo_alpha: 2, hgpo_base_group: true,
    graph_normalize_distance: false, graph_success_value: 1, episode_weight: 0 });
  assert.deepEqual(config, { preset: 'hgpo', hgpo_history_length: 0, hgpo_alpha: 2, hgpo_base_group: true,
    graph_normalize_distance: false, graph_success_value: 1, episode_weight: 0 });
  assert.equal(buildConfig('', { estimator: 'graphgpo' }).estimator, 'ESTIMATOR_GRAPHGPO');
});

const rejects = (fn, field) => assert.throws(fn, (e) => e instanceof BuildError && e.field === field);

test('bad input names the field and index', () => {
  const nan = good(); nan[1].rewards = [NaN];
  rejects(() => buildRequest(nan), 'trajectories[1].rewards[0]');
  const short = good(); short[0].rewards = [0];
  rejects(() => buildRequest(short), 'trajectories[0].rewards');
  const dup = good(); dup[1].trajectory_id = 'a';
  rejects(() => buildRequest(dup), 'trajectories[1].trajectory_id');
  const extra = good(); extra[0].reward = 1;
  rejects(() => buildRequest(extra), 'trajectories[0].reward');
  const empty = good(); empty[0].states = []; empty[0].rewards = [];
  rejects(() => buildRequest(empty), 'trajectories[0].states');
  rejects(() => buildRequest([]), 'trajectories');
  rejects(() => buildConfig('', { similarity: 'cosine' }), 'config.similarity');
  rejects(() => buildConfig('', { tau: 'hot' }), 'config.tau');
  rejects(() => buildConfig('', { temperature: 1 }), 'config.temperature');
  rejects(() => buildConfig('', { hgpo_history_length: 1.5 }), 'config.hgpo_history_length');
  rejects(() => buildConfig('', { hgpo_history_length: -1 }), 'config.hgpo_history_length');
  rejects(() => buildConfig('', { hgpo_base_group: 1 }), 'config.hgpo_base_group');
});
