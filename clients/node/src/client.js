'use strict';
/**
 * Node.js client of proxmo.v1.CreditAssignmentService.
 *
 * The messages and the service come from protos/proxmo/v1/proxmo.proto, loaded at run time
 * (@grpc/proto-loader): nothing is generated, so this client follows the contract file itself.
 * Field names are the proto names (keepCase), exactly as the Python client spells them.
 *
 * Behaviour shared with the Python client (proxmo_client):
 *  - every unary call has a deadline (timeoutMs, default 30 s) covering its retries; a
 *    computeAdvantages left to the default, with 1,000 or more distinct states for the server's
 *    encoder, gets the default plus twice the time they take at the encoder rate the server
 *    measures (GetServerInfo encoder.states_per_second, read once a minute): see
 *    encoderDeadlineMs;
 *  - UNAVAILABLE (server unreachable, warming up or draining) and CANCELLED from the server (a
 *    terminating replica cancels calls that reach it while grpc's own stop() runs) are retried,
 *    with backoff min(maxBackoffMs, backoffMs * 2^k) * U(0.5, 1]. Every unary RPC is safe to
 *    repeat: a ComputeAdvantages retry re-sends the same request_id, so the server applies the
 *    batch's success-rate update once; the others are reads or idempotent. This client never
 *    cancels a call itself, and a closed client retries nothing.
 */
const path = require('node:path');
const crypto = require('node:crypto');
const net = require('node:net');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');
const PROTO_FILE = 'proxmo/v1/proxmo.proto';
const DEFAULT_TIMEOUT_MS = 30000;
// Sizing the deadline of a batch the server must encode (as proxmo_client.deadline).
const ENCODE_HEADROOM = 2;
const ENCODER_DEADLINE_MIN_STATES = 1000;
const SERVER_INFO_MAX_AGE_MS = 60000;
const SERVER_INFO_TIMEOUT_MS = 5000;
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

// Config fields that are enums, and the prefix of their value names in the proto.
const ENUM_PREFIX = {
  estimator: 'ESTIMATOR_',
  episode_normalization: 'NORMALIZATION_',
  step_normalization: 'NORMALIZATION_',
  stats_unit: 'STATS_UNIT_',
  success_rate_source: 'SUCCESS_RATE_SOURCE_',
  similarity: 'SIMILARITY_',
  scope: 'SCOPE_',
};
const ENUM_TYPE = {
  ESTIMATOR_: 'Estimator',
  NORMALIZATION_: 'Normalization',
  STATS_UNIT_: 'StatsUnit',
  SUCCESS_RATE_SOURCE_: 'SuccessRateSource',
  SIMILARITY_: 'Similarity',
  SCOPE_: 'Scope',
};
const BOOL_CONFIG = new Set(['psc_enabled', 'hgpo_base_group', 'graph_normalize_distance']);
const INTEGER_CONFIG = new Set(['hgpo_history_length']); // uint32 in the proto
const TRAJECTORY_KEYS = ['trajectory_id', 'group_id', 'task_id', 'states', 'rewards', 'invalid',
  'success', 'state_keys', 'embeddings'];

/** Bad input found before sending: `field` names the place, e.g. "trajectories[2].rewards[1]". */
class BuildError extends Error {
  constructor(field, message) {
    super(`${field}: ${message}`);
    this.name = 'BuildError';
    this.field = field;
    this.detail = message;
  }
}

/** A failed RPC: the gRPC status code (number and name) and the server's message. */
class ProxmoError extends Error {
  constructor(error, method) {
    const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === error.code) || 'UNKNOWN';
    super(`${method}: ${codeName}: ${error.details || error.message}`);
    this.name = 'ProxmoError';
    this.code = error.code;
    this.codeName = codeName;
    this.details = error.details;
    this.metadata = error.metadata;
    this.cause = error;
  }
}

/** The proto package, loaded once per proto root. */
const loaded = new Map();
function loadProto(protoRoot = DEFAULT_PROTO_ROOT) {
  if (!loaded.has(protoRoot)) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [protoRoot],
      keepCase: true, // proto field names, as in the Python client and the proto3 text format
      longs: String, // uint64 counters arrive as decimal strings (no precision loss)
      enums: String, // enum values by name
      defaults: true, // every field present in responses, repeated ones as []
      oneofs: true,
    });
    loaded.set(protoRoot, { definition, proto: grpc.loadPackageDefinition(definition).proxmo.v1 });
  }
  return loaded.get(protoRoot);
}

function enumValues(definition, typeName) {
  return definition[`proxmo.v1.${typeName}`].type.value.map((v) => v.name);
}

function isFiniteNumber(value) {
  return typeof value === 'number' && Number.isFinite(value);
}

function asArray(value, field, length) {
  if (!Array.isArray(value)) throw new BuildError(field, 'expected an array');
  if (length !== undefined && value.length !== length) {
    throw new BuildError(field, `expected ${length} entries (one per step), got ${value.length}`);
  }
  return value;
}

function asIdentifier(value, field) {
  if (typeof value !== 'string' || value.length === 0) {
    throw new BuildError(field, 'expected a non-empty string');
  }
  return value;
}

/** An EstimatorConfig from a preset name and proto-named overrides (enums by short name). */
function buildConfig(preset, overrides = {}, protoRoot = DEFAULT_PROTO_ROOT) {
  const { definition } = loadProto(protoRoot);
  const known = definition['proxmo.v1.EstimatorConfig'].type.field.map((f) => f.name);
  const config = { preset: preset || '' };
  for (const [name, value] of Object.entries(overrides)) {
    const field = `config.${name}`;
    if (!known.includes(name) || name === 'preset') {
      throw new BuildError(field, `unknown config field; expected one of ${known.filter((n) => n !== 'preset').join(', ')}`);
    }
    if (value === null || value === undefined) continue; // the preset's value
    const prefix = ENUM_PREFIX[name];
    if (prefix) {
      const names = enumValues(definition, ENUM_TYPE[prefix]);
      const upper = String(value).trim().toUpperCase().replace(/-/g, '_');
      const full = upper.startsWith(prefix) ? upper : prefix + upper;
      if (!names.includes(full) || full.endsWith('_UNSPECIFIED')) {
        const choices = names.slice(1).map((n) => n.slice(prefix.length).toLowerCase());
        throw new BuildError(field, `unknown value ${JSON.stringify(value)}; expected one of ${choices.join(', ')}`);
      }
      config[name] = full;
    } else if (BOOL_CONFIG.has(name)) {
      if (typeof value !== 'boolean') throw new BuildError(field, `expected a boolean, got ${JSON.stringify(value)}`);
      config[name] = value;
    } else if (INTEGER_CONFIG.has(name)) {
      if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
        throw new BuildError(field, `expected a non-negative integer, got ${JSON.stringify(value)}`);
      }
      config[name] = value;
    } else {
      if (!isFiniteNumber(value)) throw new BuildError(field, `expected a finite number, got ${JSON.stringify(value)}`);
      config[name] = value;
    }
  }
  return config;
}

function buildTrajectory(item, where) {
  if (item === null || typeof item !== 'object' || Array.isArray(item)) {
    throw new BuildError(where, 'expected a trajectory object');
  }
  const unknown = Object.keys(item).filter((k) => !TRAJECTORY_KEYS.includes(k)).sort();
  if (unknown.length) throw new BuildError(`${where}.${unknown[0]}`, `unknown key; expected ${TRAJECTORY_KEYS.join(', ')}`);
  for (const key of ['trajectory_id', 'group_id', 'states', 'rewards']) {
    if (item[key] === undefined) throw new BuildError(`${where}.${key}`, 'is required');
  }
  const message = {
    trajectory_id: asIdentifier(item.trajectory_id, `${where}.trajectory_id`),
    group_id: asIdentifier(item.group_id, `${where}.group_id`),
    steps: [],
  };
  if (item.task_id !== undefined && item.task_id !== null) {
    message.task_id = asIdentifier(item.task_id, `${where}.task_id`);
  }
  if (item.success !== undefined && item.success !== null) {
    if (typeof item.success !== 'boolean') throw new BuildError(`${where}.success`, 'expected a boolean');
    message.success = item.success;
  }
  const states = asArray(item.states, `${where}.states`);
  if (states.length === 0) throw new BuildError(`${where}.states`, 'a trajectory needs at least one step');
  const n = states.length;
  const rewards = asArray(item.rewards, `${where}.rewards`, n);
  const invalid = item.invalid == null ? null : asArray(item.invalid, `${where}.invalid`, n);
  const keys = item.state_keys == null ? null : asArray(item.state_keys, `${where}.state_keys`, n);
  const embeddings = item.embeddings == null ? null : asArray(item.embeddings, `${where}.embeddings`, n);
  for (let t = 0; t < n; t += 1) {
    if (typeof states[t] !== 'string') throw new BuildError(`${where}.states[${t}]`, 'expected a string');
    if (!isFiniteNumber(rewards[t])) throw new BuildError(`${where}.rewards[${t}]`, `expected a finite number, got ${JSON.stringify(rewards[t])}`);
    const step = { state: states[t], reward: rewards[t] };
    if (invalid) {
      if (typeof invalid[t] !== 'boolean') throw new BuildError(`${where}.invalid[${t}]`, 'expected a boolean');
      step.invalid_action = invalid[t];
    }
    if (keys) {
      if (typeof keys[t] !== 'string') throw new BuildError(`${where}.state_keys[${t}]`, 'expected a string');
      step.state_key = keys[t];
    }
    if (embeddings) {
      const row = asArray(embeddings[t], `${where}.embeddings[${t}]`);
      row.forEach((x, j) => {
        if (!isFiniteNumber(x)) throw new BuildError(`${where}.embeddings[${t}][${j}]`, 'expected a finite number');
      });
      step.state_embedding = row;
    }
    message.steps.push(step);
  }
  return message;
}

/**
 * A ComputeAdvantagesRequest from trajectory objects, the same shape the Python client's
 * build_request takes: {trajectory_id, group_id, task_id?, states[], rewards[], invalid[]?,
 * success?, state_keys[]?, embeddings[][]?}. request_id defaults to a fresh uuid4: keep it when
 * re-sending the same batch so it is applied once.
 */
function buildRequest(trajectories, options = {}) {
  const { preset, requestId, dryRun = false, config = {}, protoRoot = DEFAULT_PROTO_ROOT } = options;
  if (!Array.isArray(trajectories)) throw new BuildError('trajectories', 'expected an array of trajectories');
  if (trajectories.length === 0) throw new BuildError('trajectories', 'at least one trajectory is required');
  const firstIndex = new Map();
  const messages = trajectories.map((item, i) => {
    const message = buildTrajectory(item, `trajectories[${i}]`);
    if (firstIndex.has(message.trajectory_id)) {
      throw new BuildError(`trajectories[${i}].trajectory_id`,
        `${JSON.stringify(message.trajectory_id)} repeats trajectories[${firstIndex.get(message.trajectory_id)}]`);
    }
    firstIndex.set(message.trajectory_id, i);
    return message;
  });
  return {
    request_id: requestId || crypto.randomUUID(),
    trajectories: messages,
    config: buildConfig(preset, config, protoRoot),
    dry_run: Boolean(dryRun),
  };
}

/** A PrefetchStatesRequest: the state texts, each a string (BuildError names states[i]). */
function buildPrefetchRequest(states, { wait = false } = {}) {
  if (!Array.isArray(states)) throw new BuildError('states', 'expected an array of strings');
  states.forEach((text, i) => {
    if (typeof text !== 'string') throw new BuildError(`states[${i}]`, `expected a string, got ${typeof text}`);
  });
  if (typeof wait !== 'boolean') throw new BuildError('wait', `expected a boolean, got ${JSON.stringify(wait)}`);
  return { states, wait };
}

// Status codes worth another attempt (see the header).
const RETRIED = new Set([grpc.status.UNAVAILABLE, grpc.status.CANCELLED]);

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Calls (not connections) spread over every address: HTTP/2 multiplexes all calls on one
// connection, so pick_first (gRPC's default) would pin every call to one replica.
const ROUND_ROBIN_SERVICE_CONFIG = JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] });

/**
 * The gRPC target and extra channel options: 'host:port' is one server; an array of 'ip:port'
 * (several replicas) or a 'dns:///name:port' name (a Kubernetes headless Service) balances
 * calls round-robin over every address. Same rules as the Python client's channel_target.
 */
function channelTarget(target) {
  if (typeof target === 'string') {
    if (target.startsWith('dns:')) {
      return { target, options: { 'grpc.service_config': ROUND_ROBIN_SERVICE_CONFIG } };
    }
    return { target, options: {} };
  }
  if (!Array.isArray(target) || target.length === 0) {
    throw new BuildError('target', 'must be host:port, dns:///name:port or a non-empty array of ip:port');
  }
  const families = new Set();
  for (const address of target) {
    const cut = String(address).lastIndexOf(':');
    const host = String(address).slice(0, cut).replace(/^\[|\]$/g, '');
    const family = net.isIP(host);
    if (cut < 0 || family === 0 || !/^\d+$/.test(String(address).slice(cut + 1))) {
      throw new BuildError('target', `several targets must be ip:port (use dns:///name:port for a name), got ${JSON.stringify(String(address).slice(0, 100))}`);
    }
    families.add(family);
  }
  if (families.size > 1) throw new BuildError('target', 'several targets must all be IPv4 or all IPv6');
  const scheme = families.has(6) ? 'ipv6' : 'ipv4';
  return {
    target: `${scheme}:${target.join(',')}`,
    options: { 'grpc.service_config': ROUND_ROBIN_SERVICE_CONFIG, 'grpc.default_authority': target[0] },
  };
}

class ProxmoClient {
  /**
   * @param {string|string[]} target host:port of the gRPC server (default localhost:50051), an
   *   array of ip:port or a dns:///name:port name (calls balanced round-robin, see channelTarget)
   * @param {object} options timeoutMs (default 30000), maxRetries (5), backoffMs (100),
   *   maxBackoffMs (5000), maxMessageBytes (64 MiB), credentials (insecure), protoRoot
   */
  constructor(target = 'localhost:50051', options = {}) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.maxRetries = options.maxRetries ?? 5;
    this.backoffMs = options.backoffMs ?? 100;
    this.maxBackoffMs = options.maxBackoffMs ?? 5000;
    this.protoRoot = options.protoRoot ?? DEFAULT_PROTO_ROOT;
    this.closed = false;
    const maxBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    const { proto } = loadProto(this.protoRoot);
    const balanced = channelTarget(target);
    this.stub = new proto.CreditAssignmentService(
      balanced.target,
      options.credentials ?? grpc.credentials.createInsecure(),
      {
        'grpc.max_send_message_length': maxBytes,
        'grpc.max_receive_message_length': maxBytes,
        // Keepalive as the Python client: a ping every 30 s, 10 s to answer.
        'grpc.keepalive_time_ms': 30000,
        'grpc.keepalive_timeout_ms': 10000,
        ...balanced.options,
      },
    );
  }

  /** Per-step advantages of one batch (see buildRequest for the trajectory shape). */
  computeAdvantages(trajectories, options = {}) {
    const request = buildRequest(trajectories, { ...options, protoRoot: this.protoRoot });
    if (options.timeoutMs != null || distinctStates(request) < ENCODER_DEADLINE_MIN_STATES) {
      return this.unary('ComputeAdvantages', request, options.timeoutMs);
    }
    return this.encoderInfo().then((info) => this.unary(
      'ComputeAdvantages', request, encoderDeadlineMs(request, info, this.timeoutMs)));
  }

  /** GetServerInfo, at most once a minute (null when it failed: the call itself will say). */
  async encoderInfo() {
    if (this.infoAt === undefined || Date.now() - this.infoAt > SERVER_INFO_MAX_AGE_MS) {
      try {
        this.info = await this.serverInfo({ timeoutMs: SERVER_INFO_TIMEOUT_MS });
      } catch (error) {
        if (!(error instanceof ProxmoError)) throw error;
        this.info = null;
      }
      this.infoAt = Date.now();
    }
    return this.info;
  }

  /**
   * Asks the server to embed these state texts in the background, so that a later
   * computeAdvantages with ENCODER similarity finds them cached. Call it from the rollout loop
   * as each trajectory finishes; without `wait` the server answers once they are queued (with
   * `wait`, once embedded). Only a hint: a failure never changes a result, so a rollout loop
   * may ignore its errors (they still reject, e.g. FAILED_PRECONDITION without an encoder).
   * Resolves to {distinct_states, cached_states, queued_states, dropped_states}.
   */
  prefetchStates(states, { wait = false, timeoutMs } = {}) {
    return this.unary('PrefetchStates', buildPrefetchRequest(states, { wait }), timeoutMs);
  }

  /** Success-rate histories by task id, or one page of a task-id prefix. */
  getSuccessRates({ taskIds = [], prefix = '', pageSize = 0, pageToken = '', timeoutMs } = {}) {
    return this.unary('GetSuccessRates',
      { task_ids: taskIds, prefix, page_size: pageSize, page_token: pageToken }, timeoutMs);
  }

  /** Version, presets, limits, the encoder backend. */
  serverInfo({ timeoutMs } = {}) {
    return this.unary('GetServerInfo', {}, timeoutMs);
  }

  close() {
    this.closed = true;
    this.stub.close();
  }

  async unary(method, request, timeoutMs) {
    const budget = timeoutMs ?? this.timeoutMs;
    const deadline = Date.now() + budget;
    for (let attempt = 0; ; attempt += 1) {
      try {
        return await new Promise((resolve, reject) => {
          this.stub[method](request, { deadline: new Date(deadline) }, (error, response) => {
            if (error) reject(error); else resolve(response);
          });
        });
      } catch (error) {
        if (error.code === undefined) throw error;
        const delay = Math.min(this.maxBackoffMs, this.backoffMs * 2 ** attempt) * (0.5 + Math.random() / 2);
        const retry = RETRIED.has(error.code) && !this.closed && attempt < this.maxRetries
          && Date.now() + delay < deadline;
        if (!retry) throw new ProxmoError(error, method);
        await sleep(delay);
        if (this.closed) throw new ProxmoError(error, method); // closed during the back-off
      }
    }
  }
}

function distinctStates(request) {
  return new Set(request.trajectories.flatMap((t) => t.steps.map((step) => step.state))).size;
}

/**
 * The deadline (ms) of a request whose states the server's encoder may have to embed cold:
 * defaultMs + ENCODE_HEADROOM * distinct states / the server's measured states per second, when
 * the request uses ENCODER similarity (asked for, or through its preset); else defaultMs.
 */
function encoderDeadlineMs(request, info, defaultMs) {
  const rate = info?.encoder?.states_per_second ?? 0;
  if (!(rate > 0)) return defaultMs;
  let similarity = request.config?.similarity;
  if (!similarity || similarity === 'SIMILARITY_UNSPECIFIED') {
    const name = request.config?.preset || info.default_preset;
    const preset = (info.presets ?? []).find((p) => p.name === name);
    similarity = preset ? preset.config.similarity : info.default_similarity;
  }
  if (similarity !== 'SIMILARITY_ENCODER') return defaultMs;
  return defaultMs + (1000 * ENCODE_HEADROOM * distinctStates(request)) / rate;
}

module.exports = {
  BuildError,
  channelTarget,
  ProxmoClient,
  ProxmoError,
  buildConfig,
  buildPrefetchRequest,
  buildRequest,
  encoderDeadlineMs,
  loadProto,
  DEFAULT_PROTO_ROOT,
};
