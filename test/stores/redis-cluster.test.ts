/**
 * The Redis store on a real three-master Redis Cluster (127.0.0.1:7000-7002,
 * started by test/support/redis-cluster.ts when not already up), through
 * ioredis `Cluster` and node-redis `createCluster`.
 */
import { randomBytes } from 'node:crypto';
import { Cluster } from 'ioredis';
import { type RedisClientLike, redisStore } from 'oncely/stores/redis';
import { defineStoreConformance } from 'oncely/testing';
import { createCluster } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REDIS_CLUSTER_NODES, startRedisCluster, stopRedisCluster } from '../support/redis-cluster.js';

const FP = 'v1:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd';
const newId = (): string => randomBytes(32).toString('hex');
const newPrefix = (what: string): string => `oncely-test-${what}-${randomBytes(6).toString('hex')}`;

type NodeRedisCluster = ReturnType<typeof createCluster>;

/** An ioredis Cluster set to fail fast, as the docs recommend. */
async function ioredisCluster(): Promise<Cluster> {
  const client = new Cluster(REDIS_CLUSTER_NODES, {
    enableOfflineQueue: false,
    lazyConnect: true,
    redisOptions: { maxRetriesPerRequest: 0 },
  });
  await client.connect();
  return client;
}

/** A node-redis cluster set to fail fast, as the docs recommend. */
async function nodeRedisCluster(): Promise<NodeRedisCluster> {
  const client = createCluster({
    rootNodes: REDIS_CLUSTER_NODES.map(({ host, port }) => ({ url: `redis://${host}:${port}` })),
    defaults: { disableOfflineQueue: true },
  });
  client.on('error', () => {}); // node-redis throws on an unhandled 'error' event
  await client.connect();
  return client;
}

/** Keys under `prefix`, per master. */
async function keysPerMaster(admin: Cluster, prefix: string): Promise<string[][]> {
  return Promise.all(
    admin.nodes('master').map(async (node) => {
      const keys: string[] = [];
      let cursor = '0';
      do {
        const [next, batch] = await node.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
        cursor = next;
        keys.push(...batch);
      } while (cursor !== '0');
      return keys;
    }),
  );
}

async function cleanup(admin: Cluster, prefix: string): Promise<void> {
  const perMaster = await keysPerMaster(admin, prefix);
  // One DEL per key: the keys of a batch live in different slots.
  await Promise.all(perMaster.flat().map((key) => admin.del(key)));
}

let admin: Cluster;

beforeAll(async () => {
  await startRedisCluster();
  admin = await ioredisCluster();
}, 60_000);

afterAll(async () => {
  await admin?.quit();
  await stopRedisCluster();
}, 60_000);

const clients = {
  'ioredis Cluster': { open: ioredisCluster, close: async (c: Cluster) => void (await c.quit()) },
  'node-redis createCluster': {
    open: nodeRedisCluster,
    close: async (c: NodeRedisCluster) => void (await c.close()),
  },
} as const;

for (const [kind, { open, close }] of Object.entries(clients) as [
  string,
  { open: () => Promise<RedisClientLike>; close: (c: never) => Promise<void> },
][]) {
  const prefix = newPrefix('cluster');
  const opened: RedisClientLike[] = [];
  const make = async () => {
    const client = await open();
    opened.push(client);
    return redisStore({ client, prefix });
  };

  defineStoreConformance(
    { describe, it, beforeAll, afterAll },
    {
      name: `redis (${kind})`,
      store: make,
      anotherClient: make,
      teardown: async () => {
        await cleanup(admin, prefix);
        for (const client of opened) await close(client as never);
      },
    },
  );

  describe(`redis store on a cluster (${kind})`, () => {
    const own = newPrefix('cluster-spread');
    let client: RedisClientLike;

    beforeAll(async () => {
      client = await open();
    });
    afterAll(async () => {
      await cleanup(admin, own);
      await close(client as never);
    });

    it('detects the cluster and spreads records over every master by their hash tag', async () => {
      const store = redisStore({ client, prefix: own });
      expect(store.cluster).toBe(true);
      const input = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
      const ids = Array.from({ length: 30 }, newId);
      const results = await store.claimMany!(ids, input);
      expect(results.map((r) => r.status)).toEqual(ids.map(() => 'acquired'));
      const again = await store.claimMany!([...ids.slice(0, 5), newId()], input);
      expect(again.map((r) => r.status)).toEqual([...ids.slice(0, 5).map(() => 'in_progress'), 'acquired']);
      const perMaster = await keysPerMaster(admin, own);
      expect(perMaster).toHaveLength(3);
      for (const keys of perMaster) expect(keys.length).toBeGreaterThan(0);
      expect(perMaster.flat().sort()).toEqual(
        expect.arrayContaining(ids.map((id) => store.keyOf(id)).sort()),
      );
      // Each record completes and replays on whichever master holds its slot.
      for (const [i, id] of ids.slice(0, 6).entries()) {
        const claim = results[i]!;
        if (claim.status !== 'acquired') throw new Error('expected acquired');
        expect(await store.complete(id, claim.token, `outcome ${i}`, 60_000)).toBe(true);
        const replay = await store.claim(id, input);
        expect(replay.status === 'completed' && replay.record.outcome).toBe(`outcome ${i}`);
      }
    });

    it('fails only the claim whose key is of the wrong type, and undoes the rest of a claimMany it was in', async () => {
      const store = redisStore({ client, prefix: own });
      const input = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
      const bad = newId();
      await admin.rpush(store.keyOf(bad), 'not a record');
      const good = Array.from({ length: 5 }, newId);
      const settled = await Promise.allSettled([...good, bad].map((id) => store.claim(id, input)));
      expect(settled.map((s) => s.status)).toEqual([...good.map(() => 'fulfilled'), 'rejected']);
      expect(String((settled[5] as PromiseRejectedResult).reason?.message)).toMatch(/WRONGTYPE/);
      for (const [i, id] of good.entries()) {
        const claim = (settled[i] as PromiseFulfilledResult<Awaited<ReturnType<typeof store.claim>>>).value;
        if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
        expect(await store.complete(id, claim.token, 'done', 60_000)).toBe(true);
      }
      // A claimMany spread over the masters: the ids that were claimed are released again.
      const mine = Array.from({ length: 6 }, newId);
      await expect(store.claimMany!([...mine, bad], input)).rejects.toThrow(/WRONGTYPE/);
      for (const id of mine) expect(await store.get(id)).toBeNull();
      expect(await admin.type(store.keyOf(bad))).toBe('list');
    });

    it('still claims a batch when told the client is not a cluster client', async () => {
      const store = redisStore({ client, prefix: own, cluster: false });
      const ids = Array.from({ length: 10 }, newId);
      const input = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
      const claims = await store.claimMany!(ids, input);
      expect(claims.map((r) => r.status)).toEqual(ids.map(() => 'acquired'));
      // The server's CROSSSLOT told the store; from now on each write goes alone.
      expect(store.cluster).toBe(true);
      expect((await store.claimMany!(ids, input)).map((r) => r.status)).toEqual(ids.map(() => 'in_progress'));
      // Ten completes asked in one turn, on ten slots, all land.
      const done = await Promise.all(ids.map((id, i) => store.complete(id, (claims[i] as { token: string }).token, `o${i}`, 60_000)));
      expect(done).toEqual(ids.map(() => true));
    });
  });
}
