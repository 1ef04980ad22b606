// One Node.js Redis Cluster client session against a cluster, run by
// tests/integration/test_client_compat.py:
//
//     node node_client.js CLIENT PORT PREFIX N
//
// CLIENT is ioredis, redis (node-redis 5) or redis4 (node-redis 4). Connects to one startup
// node (127.0.0.1:PORT) and prints one JSON line per phase:
//   1. N keys PREFIX:i set and read one by one, MSET/MGET on hash-tagged keys, a pipeline
//      over all shards (N INCR + N GET in flight at once), a MULTI/EXEC on one slot;
// then waits for a line on stdin (the test moves slots meanwhile) and
//   2. reads the N keys again (the moved ones answer MOVED), writes N keys PREFIX:new:i and
//      reads them back in a pipeline, then a second MULTI/EXEC.
// Nothing is asserted here: the test compares what is printed with what it expects.
'use strict';

const readline = require('readline');

const [kind, portArg, prefix, nArg] = process.argv.slice(2);
const port = Number(portArg);
const n = Number(nArg);
const range = (k) => Array.from({ length: k }, (_, i) => i);

function ioredisClient() {
  const Redis = require('ioredis');
  const version = require('ioredis/package.json').version;
  const c = new Redis.Cluster([{ host: '127.0.0.1', port }], {
    enableAutoPipelining: true,
    slotsRefreshInterval: 600000,  // no timed refresh: moved slots are learnt from MOVED
    redisOptions: { connectTimeout: 20000, maxRetriesPerRequest: 3 },
  });
  return {
    version,
    connect: () => new Promise((resolve, reject) => {
      c.once('ready', resolve);
      c.once('error', reject);
    }),
    set: (k, v) => c.set(k, v),
    get: (k) => c.get(k),
    incr: (k) => c.incr(k),
    mset: (obj) => c.mset(obj),
    mget: (keys) => c.mget(keys),
    del: (keys) => c.del(...keys),
    // ioredis's own pipeline object: every key must be in slots of one node
    taggedPipeline: async (tag) => {
      const p = c.pipeline();
      p.set(`{${tag}}:p1`, 'x').append(`{${tag}}:p1`, 'y').get(`{${tag}}:p1`);
      return (await p.exec()).map(([err, v]) => (err ? `error: ${err.message}` : v));
    },
    multi: async (key) => {
      const r = await c.multi().set(key, 1).incr(key).get(key).exec();
      return r.map(([err, v]) => (err ? `error: ${err.message}` : v));
    },
    nodes: () => c.nodes('master').map((node) => node.options.port).sort((a, b) => a - b),
    quit: () => c.quit(),
  };
}

function nodeRedisClient(pkg) {
  const { createCluster } = require(pkg);
  const version = require(`${pkg}/package.json`).version;
  const c = createCluster({
    rootNodes: [{ url: `redis://127.0.0.1:${port}` }],
    defaults: { socket: { connectTimeout: 20000 } },
  });
  c.on('error', (err) => process.stderr.write(`cluster error: ${err}\n`));
  return {
    version,
    connect: () => c.connect(),
    set: (k, v) => c.set(k, String(v)),
    get: (k) => c.get(k),
    incr: (k) => c.incr(k),
    mset: (obj) => c.mSet(obj),
    mget: (keys) => c.mGet(keys),
    del: (keys) => c.del(keys),
    taggedPipeline: async (tag) => {
      const k = `{${tag}}:p1`;
      return c.multi().set(k, 'x').append(k, 'y').get(k).execAsPipeline();
    },
    multi: (key) => c.multi().set(key, '1').incr(key).get(key).exec(),
    nodes: () => c.masters.map((node) => node.port).sort((a, b) => a - b),
    quit: () => (c.close ? c.close() : c.quit()),
  };
}

async function main() {
  const client = kind === 'ioredis' ? ioredisClient() : nodeRedisClient(kind);
  await client.connect();
  let out = { version: client.version, nodes_known: client.nodes() };

  out.set = [];
  for (const i of range(n)) out.set.push(await client.set(`${prefix}:${i}`, i));
  out.get = [];
  for (const i of range(n)) out.get.push(await client.get(`${prefix}:${i}`));

  const tagged = Object.fromEntries(['a', 'b', 'c'].map((ch) => [`{${prefix}:tag}:${ch}`, ch.toUpperCase()]));
  out.mset = await client.mset(tagged);
  out.mget = await client.mget(Object.keys(tagged));
  out.tagged_del = await client.del(Object.keys(tagged));

  // all in flight at once: the client pipelines them per node
  out.pipeline = await Promise.all(range(n).flatMap((i) => [
    client.incr(`${prefix}:ctr:${i}`), client.get(`${prefix}:${i}`)]));
  out.tagged_pipeline = await client.taggedPipeline(`${prefix}:pipe`);
  out.tx = await client.multi(`{${prefix}:tx}:a`);
  console.log(JSON.stringify(out));

  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => rl.once('line', resolve));  // the test moves slots meanwhile
  rl.close();

  out = { get_old: [] };
  for (const i of range(n)) out.get_old.push(await client.get(`${prefix}:${i}`));
  out.set_new = [];
  for (const i of range(n)) out.set_new.push(await client.set(`${prefix}:new:${i}`, i));
  out.get_new = await Promise.all(range(n).map((i) => client.get(`${prefix}:new:${i}`)));
  out.tx2 = await client.multi(`{${prefix}:tx2}:a`);
  out.nodes_known = client.nodes();
  console.log(JSON.stringify(out));
  await client.quit();
}

main().then(() => process.exit(0), (err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
