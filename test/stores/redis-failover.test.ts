/**
 * Failovers of a replicated Redis Cluster under load, with and without the
 * store's replication guarantee. A six-node cluster of its own
 * (127.0.0.1:7100-7105: three primaries, one replica each, started and
 * stopped by this file), and two workloads at once on it, one per setting:
 * three app workers each (own ioredis Cluster client, own Engine over the
 * Redis store) run every key concurrently, as three copies of one HTTP
 * request retried until they get an answer, and count the executions per key.
 *
 * Each failover makes a replica fall behind first, as a real one does: the
 * replica sleeps (`DEBUG SLEEP`), the primary drops it (`CLIENT KILL TYPE
 * replica`) and keeps confirming writes alone for LAG_MS, then dies (SIGKILL);
 * the replica is promoted, and the old primary comes back as its replica.
 * A plain kill -9 on loopback shows nothing: the replica has every write
 * before the client has the reply.
 *
 * With replication on, no key may run twice. Without it, the duplicates are
 * counted and printed (not asserted: how many depends on timing).
 */
import { randomBytes } from 'node:crypto';
import { Cluster, Redis } from 'ioredis';
import { Engine } from 'oncely';
import { type RedisClientLike, type RedisReplicationOptions, redisStore } from 'oncely/stores/redis';
import { createCluster } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ReplicatedRedis, startReplicatedCluster } from '../support/redis-replicated-cluster.js';

const PORTS = [7100, 7101, 7102, 7103, 7104, 7105] as const;
const FAILOVERS = 6;
/** How long the primary confirms writes that no replica has, before it dies. */
const LAG_MS = 300;
/** Keys in flight per workload, each run by three workers. */
const LANES = 16;
const LEASE_MS = 15_000;
/** Longer than a failover takes here, so that a live process's session never lapses during one. */
const SESSION_TTL_MS = 10_000;
const REPLICATION: RedisReplicationOptions = { replicas: 1, timeoutMs: 250 };
const FP = 'v1:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff';
const INPUT = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(16).toString('hex');
const newPrefix = (what: string): string => `oncely-test-failover-${what}-${randomBytes(6).toString('hex')}`;

async function waitFor(what: string, check: () => Promise<boolean>, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** An ioredis Cluster set up as the docs recommend (fail fast), with quick rediscovery. */
async function ioredisCluster(redis: ReplicatedRedis): Promise<Cluster> {
  const client = new Cluster([...redis.nodes], {
    enableOfflineQueue: false,
    lazyConnect: true,
    redisOptions: { maxRetriesPerRequest: 0, connectTimeout: 1_000 },
    retryDelayOnFailover: 100,
    retryDelayOnClusterDown: 100,
    slotsRefreshTimeout: 1_000,
    slotsRefreshInterval: 1_000,
    clusterRetryStrategy: () => 200,
  });
  client.on('error', () => {});
  client.on('node error', () => {});
  await client.connect();
  return client;
}

async function waits(redis: ReplicatedRedis, port: number): Promise<number> {
  return Number(/cmdstat_wait:calls=(\d+)/.exec(await redis.cli(port, 'info', 'commandstats'))?.[1] ?? 0);
}

/** Keys under `prefix` on the given nodes (SCAN needs no READONLY on a replica). */
async function countKeys(redis: ReplicatedRedis, ports: number[], prefix: string): Promise<number> {
  let total = 0;
  for (const port of ports) {
    const out = await redis.cli(port, '--scan', '--pattern', `${prefix}:*`);
    total += out === '' ? 0 : out.split('\n').length;
  }
  return total;
}

interface Workload {
  readonly name: string;
  readonly executions: Map<string, number>;
  readonly answers: Record<string, number>;
  readonly settled: Record<string, number>;
  /** What happened to each key, kept for printing the keys that ran twice. */
  readonly trace: Map<string, string[]>;
  keys: number;
  gaveUp: number;
}

const duplicates = (w: Workload): number => {
  let n = 0;
  for (const count of w.executions.values()) n += count - 1;
  return n;
};

describe('redis store failover (six-node cluster on 127.0.0.1:7100-7105)', () => {
  let redis: ReplicatedRedis;
  const closers: Array<() => Promise<unknown> | unknown> = [];

  beforeAll(async () => {
    redis = await startReplicatedCluster({ ports: PORTS, nodeTimeoutMs: 1_000 });
  }, 90_000);
  afterAll(async () => {
    for (const close of closers) await Promise.resolve(close()).catch(() => {});
    await redis?.stop();
  }, 60_000);

  describe.each(['ioredis', 'node-redis'])('replication through %s', (kind) => {
    it('sends one WAIT per primary for the writes of one turn, and answers once the replicas have them', async () => {
      let client: RedisClientLike;
      if (kind === 'ioredis') {
        const c = await ioredisCluster(redis);
        closers.push(() => c.disconnect());
        client = c;
      } else {
        const c = createCluster({
          rootNodes: redis.nodes.map(({ host, port }) => ({ url: `redis://${host}:${port}` })),
          defaults: { disableOfflineQueue: true },
        });
        c.on('error', () => {});
        await c.connect();
        closers.push(() => c.close());
        client = c;
      }
      const prefix = newPrefix(`wait-${kind}`);
      const store = redisStore({ client, prefix, replication: { replicas: 1, timeoutMs: 1_000 }, replayCache: false });
      expect(store.cluster).toBe(true);
      // Scripts cached on every primary first (a cold one costs an EVAL round with its own WAIT).
      await Promise.all(Array.from({ length: 60 }, () => store.claim(newId(), INPUT)));
      const shards = await redis.shards();
      const before = await Promise.all(shards.map((s) => waits(redis, s.primary)));
      const ids = Array.from({ length: 60 }, newId);
      const claims = await Promise.all(ids.map((id) => store.claim(id, INPUT)));
      expect(claims.every((c) => c.status === 'acquired')).toBe(true);
      // Counted on the replicas right after the answers: every claim is there.
      expect(await countKeys(redis, shards.flatMap((s) => s.replicas), prefix)).toBe(120);
      const after = await Promise.all(shards.map((s) => waits(redis, s.primary)));
      expect(after.map((n, i) => n - before[i]!)).toEqual([1, 1, 1]);
    });
  });

  it(`runs no key twice across ${FAILOVERS} failovers with replication on, and counts the duplicates without`, async () => {
    const started = Date.now();
    const workloads: Array<{ w: Workload; workers: Engine[] }> = [];
    for (const [name, replication] of [
      ['replication on', REPLICATION],
      ['replication off', undefined],
    ] as const) {
      const prefix = newPrefix(name.replace(/\W+/g, '-'));
      const workers: Engine[] = [];
      for (let i = 0; i < 3; i++) {
        const client = await ioredisCluster(redis);
        closers.push(() => client.disconnect());
        const store = redisStore({ client, prefix, ...(replication ? { replication } : {}) });
        // Sessions outlive a failover (2 to 4 s here), as docs/engine.md advises: with the default
        // 1 s TTL a copy that arrives after the store is back and before the owner's next heartbeat
        // takes over a claim whose completion is still being retried, and runs it again.
        workers.push(new Engine({ store, leaseMs: LEASE_MS, storeTimeoutMs: 3_000, sessions: { ttlMs: SESSION_TTL_MS } }));
      }
      workloads.push({
        w: { name, executions: new Map(), answers: {}, settled: {}, trace: new Map(), keys: 0, gaveUp: 0 },
        workers,
      });
    }

    // One copy of a request: retried on 409 and 503 as a client would, until it has an answer.
    const request = async (w: Workload, engine: Engine, id: string, worker: number): Promise<void> => {
      const note = (what: string): void => {
        const lines = w.trace.get(id) ?? [];
        lines.push(`${Date.now() - started} ms worker ${worker}: ${what}`);
        w.trace.set(id, lines);
      };
      await sleep(Math.random() * 20);
      const until = Date.now() + 60_000;
      while (Date.now() < until) {
        const begun = await engine.begin({ id, fingerprint: FP });
        w.answers[begun.kind] = (w.answers[begun.kind] ?? 0) + 1;
        if (begun.kind !== 'in_flight') note(begun.kind === 'unavailable' ? `unavailable (${begun.error.message})` : begun.kind);
        if (begun.kind === 'run') {
          w.executions.set(id, (w.executions.get(id) ?? 0) + 1);
          await sleep(2 + Math.random() * 8); // the handler's work
          const settled = await begun.claim.settle({ kind: 'complete', outcome: '{"status":201}' });
          note(`settled: ${settled}`);
          w.settled[settled] = (w.settled[settled] ?? 0) + 1;
          return;
        }
        if (begun.kind === 'replay') return;
        if (begun.kind === 'mismatch' || begun.kind === 'bypass') throw new Error(`unexpected ${begun.kind}`);
        await sleep(50 + Math.random() * 100);
      }
      w.gaveUp++;
    };

    let running = true;
    const lanes = workloads.flatMap(({ w, workers }) =>
      Array.from({ length: LANES }, async () => {
        while (running) {
          const id = newId();
          await Promise.all(workers.map((engine, worker) => request(w, engine, id, worker)));
          w.keys++;
        }
      }),
    );

    const log: string[] = [];
    const dupes = (): number[] => workloads.map(({ w }) => duplicates(w));
    let failovers = 0;
    try {
      for (let i = 0; i < FAILOVERS; i++) {
        await sleep(1_500); // steady load first
        const shard = (await redis.shards())[i % 3]!;
        const primary = shard.primary;
        const replica = shard.replicas[0]!;
        const before = dupes();
        const onPrimary = new Redis({ port: primary, maxRetriesPerRequest: 0, lazyConnect: true });
        const onReplica = new Redis({ port: replica, maxRetriesPerRequest: 0, lazyConnect: true });
        onPrimary.on('error', () => {});
        onReplica.on('error', () => {});
        try {
          await onPrimary.connect();
          await onReplica.connect();
          // The replica stops reading; the primary drops it and confirms writes alone; then dies.
          const asleep = onReplica.call('DEBUG', 'SLEEP', String((LAG_MS + 300) / 1000)).catch(() => {});
          await sleep(30);
          await onPrimary.call('CLIENT', 'KILL', 'TYPE', 'replica');
          await sleep(LAG_MS);
          redis.kill(primary);
          const killed = Date.now();
          await asleep;
          await waitFor(`${replica} promoted`, async () => (await redis.cli(replica, 'role')).startsWith('master'), 30_000);
          const promoted = Date.now() - killed;
          await redis.restart(primary);
          await redis.settled(1, 60_000);
          failovers++;
          const after = dupes();
          log.push(
            `failover ${failovers}: ${primary} killed, ${replica} promoted in ${promoted} ms, back to 3+3 after ${Date.now() - killed} ms; ` +
              `duplicates: ${workloads.map(({ w }, k) => `${w.name} +${after[k]! - before[k]!}`).join(', ')}`,
          );
        } finally {
          onPrimary.disconnect();
          onReplica.disconnect();
        }
      }
      await sleep(1_000);
    } finally {
      running = false;
      await Promise.all(lanes);
    }

    const seconds = ((Date.now() - started) / 1000).toFixed(1);
    const summary = workloads.map(({ w }) => {
      const executed = w.executions.size;
      return (
        `${w.name}: ${w.keys} keys (${(w.keys / Number(seconds)).toFixed(0)}/s), ${executed} executed, ${duplicates(w)} duplicate executions, ` +
        `${w.gaveUp} gave up; begins ${JSON.stringify(w.answers)}; settled ${JSON.stringify(w.settled)}`
      );
    });
    // The story of every key that ran twice, for whoever reads a failure.
    const twice = workloads.flatMap(({ w }) =>
      [...w.executions].filter(([, n]) => n > 1).map(([id]) => [`${w.name}, key ${id}:`, ...(w.trace.get(id) ?? [])].join('\n  ')),
    );
    console.log(
      [`redis failover: ${failovers} failovers in ${seconds} s (lag ${LAG_MS} ms before each kill)`, ...log, ...summary, ...twice.slice(0, 6)].join('\n'),
    );

    expect(failovers).toBeGreaterThanOrEqual(5);
    const [on, off] = workloads.map(({ w }) => w);
    expect(on!.keys).toBeGreaterThan(100);
    expect(off!.keys).toBeGreaterThan(100);
    expect(on!.gaveUp).toBe(0);
    expect(duplicates(on!)).toBe(0);
    // Every completion got through in the end: each failover cuts the
    // completions and the session heartbeats off together for a few seconds,
    // and a completion that gave up at the session's end (not the lease's)
    // left its record in progress until a retry ran it again.
    expect(on!.settled.unsettled ?? 0).toBe(0);
  }, 280_000);
});
