#!/usr/bin/env node
'use strict';
/**
 * Compute advantages from Node.js.
 *
 *   node examples/compute.js [--target localhost:50051] [--input batch.json] [--json]
 *
 * batch.json: {"trajectories": [...], "preset": "proxmo", "config": {...}, "request_id": "...",
 * "dry_run": false}, the trajectories in the Python client's dict shape. Without --input, a
 * small built-in batch is scored. --json prints the whole response as JSON (proto field names).
 */
const fs = require('node:fs');
const { ProxmoClient, BuildError } = require('../src/client');

const DEMO = {
  preset: 'proxmo',
  dry_run: true,
  trajectories: [
    { trajectory_id: 't0', group_id: 'g0', task_id: 'find-mug',
      states: ['You are in the kitchen.', 'You see a mug.', 'You take the mug.'], rewards: [0, 0, 1] },
    { trajectory_id: 't1', group_id: 'g0', task_id: 'find-mug',
      states: ['You are in the kitchen.', 'You see a sink.'], rewards: [0, 0] },
    { trajectory_id: 't2', group_id: 'g0', task_id: 'find-mug',
      states: ['You are in the kitchen.', 'You see a mug.', 'Nothing happens.'], rewards: [0, 0, 0],
      invalid: [false, false, true] },
  ],
};

function parseArgs(argv) {
  const args = { target: process.env.PROXMO_TARGET || 'localhost:50051', input: null, json: false };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--target') args.target = argv[(i += 1)];
    else if (argv[i] === '--input') args.input = argv[(i += 1)];
    else if (argv[i] === '--json') args.json = true;
    else throw new Error(`unknown argument ${argv[i]}; usage: compute.js [--target HOST:PORT] [--input FILE] [--json]`);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const batch = args.input ? JSON.parse(fs.readFileSync(args.input, 'utf8')) : DEMO;
  const client = new ProxmoClient(args.target);
  try {
    const response = await client.computeAdvantages(batch.trajectories, {
      preset: batch.preset, config: batch.config, requestId: batch.request_id, dryRun: batch.dry_run,
    });
    if (args.json) {
      process.stdout.write(`${JSON.stringify(response)}\n`);
    } else {
      for (const t of response.trajectories) {
        console.log(`${t.trajectory_id}: ${t.advantages.map((a) => a.toFixed(4)).join(' ')}`);
      }
      for (const g of response.groups) {
        console.log(`group ${g.group_id} (task ${g.task_id}): p=${g.success_rate.toFixed(3)} from ${g.success_rate_source}`);
      }
    }
  } finally {
    client.close();
  }
}

main().catch((error) => {
  // A clear one-line error naming the field (BuildError) or the gRPC status (ProxmoError).
  console.error(error instanceof BuildError ? `bad input: ${error.message}` : error.message);
  process.exit(1);
});
