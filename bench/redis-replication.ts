/**
 * The Redis store with and without its replication guarantee (issue 15):
 * what `replication: { replicas: 1, timeoutMs }` costs in throughput and
 * latency, on a primary with one replica and on a six-node cluster (three
 * primaries, one replica each), all on loopback.
 *
 * One process plays one app server: one ioredis client (Redis or Cluster), an
 * Engine over the store, CONCURRENCY requests at a time, each a new key
 * (`begin`, then `complete`: the miss path, two writes). Beside them one loop
 * reads records (`store.get`) back to back: unrelated traffic on the same
 * connections, which waits behind every WAIT. Each round runs every
 * (topology, setting) pair back to back, in rotating order, so the ratio
 * compares figures measured side by side.
 *
 *   npm run bench:redis-replication
 *   (node --conditions=source --import tsx bench/redis-replication.ts)
 *   ROUNDS=5 DURATION=4 WARMUP=1 CONCURRENCY=64 TIMEOUT_MS=100 (the defaults: about 2 minutes)
 *
 * Starts its own servers on 127.0.0.1:7120-7121 (primary and replica) and
 * 7130-7135 (cluster) and stops them at the end; a watchdog ends the run
 * after 5 minutes. Writes the table into docs/benchmarks.md (section
 * "redis-replication"; WRITE_DOC=0 only prints). Not a test.
 */
import { randomBytes } from 'node:crypto';
import { loadavg } from 'node:os';
import { Cluster, Redis } from 'ioredis';
import { Engine } from 'oncely';
import { type RedisReplicationOptions, type RedisStore, redisStore } from 'oncely/stores/redis';
import { type ReplicatedRedis, startReplicatedCluster, startReplicatedPrimary } from '../test/support/redis-replicated-cluster.js';
import { writeSection } from './lib/doc.js';
import { fmtRange, summarise, table } from './lib/load.js';
import { machine } from './lib/machine.js';

const ROUNDS = Number(process.env.ROUNDS ?? 5);
const DURATION = Number(process.env.DURATION ?? 4);
const WARMUP = Number(process.env.WARMUP ?? 1);
const CONCURRENCY = Number(process.env.CONCURRENCY ?? 64);
const TIMEOUT_MS = Number(process.env.TIMEOUT_MS ?? 100);
const WRITE_DOC = process.env.WRITE_DOC !== '0';
const REPLICATION: RedisReplicationOptions = { replicas: 1, timeoutMs: TIMEOUT_MS };
const FP = 'v1:0000000000000000000000000000000000000000000000000000000000000000';

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(16).toString('hex');

interface Topology {
  name: string;
  redis: ReplicatedRedis;
  client: Redis | Cluster;
}

interface Sample {
  reqs: number;
  p50: number;
  p99: number;
  getP99: number;
  waitsPerReq: number;
  refused: number;
  /** CPU of this process (the app), µs per request. */
  appCpu: number;
  /** CPU of every Redis server (primaries and replicas), µs per request. */
  redisCpu: number;
}

const percentile = (sorted: number[], p: number): number => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? Number.NaN;

async function waitCalls(redis: ReplicatedRedis): Promise<number> {
  let n = 0;
  for (const shard of await redis.shards()) {
    n += Number(/cmdstat_wait:calls=(\d+)/.exec(await redis.cli(shard.primary, 'info', 'commandstats'))?.[1] ?? 0);
  }
  return n;
}

/** CPU seconds every server of `redis` has used so far. */
async function redisCpu(redis: ReplicatedRedis): Promise<number> {
  let total = 0;
  for (const port of redis.ports) {
    const info = await redis.cli(port, 'info', 'cpu');
    total += Number(/used_cpu_user:([\d.]+)/.exec(info)?.[1] ?? 0) + Number(/used_cpu_sys:([\d.]+)/.exec(info)?.[1] ?? 0);
  }
  return total;
}

/** DURATION seconds of load (after WARMUP) on one store; the figures of the measured part. */
async function measure(topology: Topology, store: RedisStore): Promise<Sample> {
  const engine = new Engine({ store, leaseMs: 30_000, storeTimeoutMs: 5_000 });
  let measuring = false;
  let running = true;
  const latencies: number[] = [];
  const gets: number[] = [];
  let refused = 0;
  const worker = async (): Promise<void> => {
    while (running) {
      const t = performance.now();
      const begun = await engine.begin({ id: newId(), fingerprint: FP });
      if (begun.kind !== 'run') {
        if (measuring) refused++;
        continue;
      }
      await begun.claim.settle({ kind: 'complete', outcome: '{"status":201,"body":"ok"}' });
      if (measuring) latencies.push(performance.now() - t);
    }
  };
  const reader = async (): Promise<void> => {
    while (running) {
      const t = performance.now();
      await store.get(newId());
      if (measuring) gets.push(performance.now() - t);
    }
  };
  const loops = [...Array.from({ length: CONCURRENCY }, worker), reader()];
  await sleep(WARMUP * 1000);
  const waits0 = await waitCalls(topology.redis);
  const redis0 = await redisCpu(topology.redis);
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  measuring = true;
  await sleep(DURATION * 1000);
  measuring = false;
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const redis1 = await redisCpu(topology.redis);
  const waits1 = await waitCalls(topology.redis);
  running = false;
  await Promise.all(loops);
  latencies.sort((a, b) => a - b);
  gets.sort((a, b) => a - b);
  return {
    reqs: latencies.length / seconds,
    p50: percentile(latencies, 0.5),
    p99: percentile(latencies, 0.99),
    getP99: percentile(gets, 0.99),
    // The figures include the few WAITs of the cache probes; per request they round away.
    waitsPerReq: latencies.length > 0 ? (waits1 - waits0) / latencies.length : 0,
    refused,
    appCpu: (cpu.user + cpu.system) / latencies.length,
    redisCpu: ((redis1 - redis0) * 1e6) / latencies.length,
  };
}

async function main(): Promise<void> {
  const started = Date.now();
  const load0 = loadavg();
  const servers: ReplicatedRedis[] = [];
  const clients: Array<Redis | Cluster> = [];
  const watchdog = setTimeout(() => {
    console.error('bench/redis-replication: watchdog after 5 minutes; stopping');
    void Promise.all(servers.map((s) => s.stop())).finally(() => process.exit(2));
  }, 5 * 60_000);
  watchdog.unref();
  try {
    const pair = await startReplicatedPrimary({ ports: [7120, 7121] });
    servers.push(pair);
    const cluster = await startReplicatedCluster({ ports: [7130, 7131, 7132, 7133, 7134, 7135] });
    servers.push(cluster);
    const standaloneClient = new Redis({ port: 7120, enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true });
    await standaloneClient.connect();
    const clusterClient = new Cluster([...cluster.nodes], {
      enableOfflineQueue: false,
      lazyConnect: true,
      redisOptions: { maxRetriesPerRequest: 0 },
    });
    await clusterClient.connect();
    clients.push(standaloneClient, clusterClient);
    const topologies: Topology[] = [
      { name: 'primary + 1 replica', redis: pair, client: standaloneClient },
      { name: 'cluster, 3 primaries + 3 replicas', redis: cluster, client: clusterClient },
    ];
    const settings = [
      { name: 'off', replication: undefined },
      { name: `on (replicas 1, timeoutMs ${TIMEOUT_MS})`, replication: REPLICATION },
    ] as const;
    const pairs = topologies.flatMap((topology) => settings.map((setting) => ({ topology, setting })));
    const samples = new Map<string, Sample[]>();
    const ratios = new Map<string, number[]>();
    for (let round = 0; round < ROUNDS; round++) {
      const byPair = new Map<string, Sample>();
      for (let i = 0; i < pairs.length; i++) {
        const { topology, setting } = pairs[(i + round) % pairs.length]!;
        const store = redisStore({
          client: topology.client,
          prefix: `oncely-bench-repl-${randomBytes(4).toString('hex')}`,
          ...(setting.replication ? { replication: setting.replication } : {}),
        });
        const sample = await measure(topology, store);
        const key = `${topology.name}|${setting.name}`;
        byPair.set(key, sample);
        samples.set(key, [...(samples.get(key) ?? []), sample]);
        console.log(
          `round ${round + 1}: ${topology.name}, replication ${setting.name}: ${sample.reqs.toFixed(0)} req/s, ` +
            `p50 ${sample.p50.toFixed(2)} ms, p99 ${sample.p99.toFixed(2)} ms, get p99 ${sample.getP99.toFixed(2)} ms, ` +
            `${sample.waitsPerReq.toFixed(3)} WAIT/req, ${sample.refused} refused, ` +
            `CPU µs/req app ${sample.appCpu.toFixed(0)} redis ${sample.redisCpu.toFixed(0)}`,
        );
        // Records would stay a day (the engine's default ttl): these servers are ours, so drop them now.
        for (const s of await topology.redis.shards()) await topology.redis.cli(s.primary, 'flushall');
      }
      for (const topology of topologies) {
        const off = byPair.get(`${topology.name}|${settings[0].name}`)!;
        const on = byPair.get(`${topology.name}|${settings[1].name}`)!;
        ratios.set(topology.name, [...(ratios.get(topology.name) ?? []), on.reqs / off.reqs]);
      }
    }

    const rows = pairs.map(({ topology, setting }) => {
      const s = samples.get(`${topology.name}|${setting.name}`)!;
      const ratio = setting.replication ? fmtRange(summarise(ratios.get(topology.name)!), 2) : '1';
      return [
        topology.name,
        setting.name,
        fmtRange(summarise(s.map((x) => x.reqs))),
        ratio,
        fmtRange(summarise(s.map((x) => x.p50)), 2),
        fmtRange(summarise(s.map((x) => x.p99)), 2),
        fmtRange(summarise(s.map((x) => x.getP99)), 2),
        fmtRange(summarise(s.map((x) => x.waitsPerReq)), 3),
        fmtRange(summarise(s.map((x) => x.appCpu))),
        fmtRange(summarise(s.map((x) => x.redisCpu))),
        String(s.reduce((n, x) => n + x.refused, 0)),
      ];
    });
    const load1 = loadavg();
    const seconds = ((Date.now() - started) / 1000).toFixed(0);
    const body = [
      '## Redis store: the replication guarantee',
      '',
      `The miss path (a new key: \`begin\`, then \`complete\`) through the Engine, ${CONCURRENCY} requests at a time in one process over one ioredis client, with one more loop reading records (\`store.get\`) beside them: the reads share the connections the WAITs block. Median (min–max) of ${ROUNDS} rounds of ${DURATION} s; the ratio is taken per round, both settings measured back to back.`,
      '',
      table(
        [
          'topology',
          'replication',
          'req/s',
          'on / off',
          'p50 ms',
          'p99 ms',
          'get p99 ms',
          'WAIT per request',
          'app CPU µs/req',
          'Redis CPU µs/req',
          'refused',
        ],
        rows,
      ),
      '',
      '- "WAIT per request": WAIT commands the primaries ran, per request (two writes each); under 1 because one WAIT per node covers every write of one event-loop turn.',
      '- CPU per request: of this process (engine, store, ioredis, the get loop), and of all the Redis servers together (primaries and replicas); less sensitive to other work on the machine than req/s.',
      '- "refused": begins that did not run (503: the replica did not acknowledge within `timeoutMs`).',
      '- oncely is loaded from `src/` through tsx in both settings.',
      '- On loopback a replica answers a WAIT within microseconds; across a network every batch waits one more primary-to-replica round trip, with its connection blocked meanwhile, which this table cannot show.',
      '',
      'Machine:',
      '',
      machine().replace(
        /on 127\.0\.0\.1:6379 \(shared with the load generator and the server\)/,
        'on 127.0.0.1:7120-7121 and 7130-7135, started by the benchmark',
      ),
      `- load average (1, 5, 15 min) at start ${load0.map((n) => n.toFixed(1)).join(', ')}, at end ${load1.map((n) => n.toFixed(1)).join(', ')}`,
      '',
      `Command: \`npm run bench:redis-replication\` (ROUNDS=${ROUNDS} DURATION=${DURATION} WARMUP=${WARMUP} CONCURRENCY=${CONCURRENCY} TIMEOUT_MS=${TIMEOUT_MS}); ${seconds} s in all, ${new Date().toISOString().slice(0, 16)}Z.`,
    ].join('\n');
    console.log(`\n${body}`);
    if (WRITE_DOC) writeSection('redis-replication', body);
  } finally {
    for (const c of clients) c.disconnect();
    for (const s of servers) await s.stop();
    clearTimeout(watchdog);
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
