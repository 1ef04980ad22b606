// node-redis's plain client (createClient, no cluster support) against a moonmesh proxy's
// plain listener, run by tests/integration/test_plain_clients.py:
//
//     node node_plain.js PORT PREFIX N
//
// Writes N keys PREFIX:i, reads them back one by one, MGETs every fifth, SCANs PREFIX:*, and
// prints one JSON line. Nothing is asserted here: the test compares.
'use strict';

const { createClient } = require('redis');

const [portArg, prefix, nArg] = process.argv.slice(2);
const n = Number(nArg);
const range = (k) => Array.from({ length: k }, (_, i) => i);

(async () => {
  const c = createClient({ socket: { host: '127.0.0.1', port: Number(portArg) } });
  c.on('error', (err) => { console.error(err); process.exit(1); });
  await c.connect();
  await Promise.all(range(n).map((i) => c.set(`${prefix}:${i}`, String(i))));
  const read = [];
  for (const i of range(n)) read.push(await c.get(`${prefix}:${i}`));
  const mget = await c.mGet(range(n).filter((i) => i % 5 === 0).map((i) => `${prefix}:${i}`));
  const scanned = [];
  for await (const keys of c.scanIterator({ MATCH: `${prefix}:*`, COUNT: 100 })) {
    scanned.push(...(Array.isArray(keys) ? keys : [keys]));
  }
  console.log(JSON.stringify({ read, mget, scanned }));
  await c.quit();
})();
