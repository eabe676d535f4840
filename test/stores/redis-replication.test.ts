/**
 * The Redis store's replication guarantee (`replication: { replicas,
 * timeoutMs }`) on a standalone primary with one replica, started for this
 * file on 127.0.0.1:7110-7111 (test/support/redis-replicated-cluster.ts),
 * through ioredis and node-redis: writes count once the replica has them, one
 * WAIT per turn of the event loop, and what is refused when the replica does
 * not answer. The Cluster side and the failovers are in redis-failover.test.ts.
 */
import { randomBytes } from 'node:crypto';
import { Redis } from 'ioredis';
import { Engine } from 'oncely';
import { type RedisClientLike, type RedisReplicationOptions, type RedisStore, redisStore } from 'oncely/stores/redis';
import { createClient } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, StoreUnavailableError } from '../../src/errors/index.js';
import { type ReplicatedRedis, startReplicatedPrimary } from '../support/redis-replicated-cluster.js';

const PRIMARY = 7110;
const REPLICA = 7111;
const FP = 'v1:eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee';
const INPUT = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
const ON: RedisReplicationOptions = { replicas: 1, timeoutMs: 1_000 };
// More replicas than there are: every WAIT comes back short.
const SHORT: RedisReplicationOptions = { replicas: 2, timeoutMs: 100 };
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(32).toString('hex');
const newPrefix = (what: string): string => `oncely-test-repl-${what}-${randomBytes(6).toString('hex')}`;

type NodeRedis = ReturnType<typeof createClient>;

async function ioredis(port: number): Promise<Redis> {
  const client = new Redis({ host: '127.0.0.1', port, enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true });
  await client.connect();
  return client;
}

async function nodeRedis(port: number): Promise<NodeRedis> {
  const client = createClient({ url: `redis://127.0.0.1:${port}`, disableOfflineQueue: true });
  client.on('error', () => {});
  await client.connect();
  return client;
}

/** WAIT commands the server has run so far. */
async function waits(admin: Redis): Promise<number> {
  const stats = String(await admin.info('commandstats'));
  return Number(/cmdstat_wait:calls=(\d+)/.exec(stats)?.[1] ?? 0);
}

describe('redis store replication options', () => {
  const fake = { evalsha: async () => null, eval: async () => null, pipeline: () => ({}) } as unknown as RedisClientLike;

  it.each([
    ['replicas 0', { replicas: 0, timeoutMs: 100 }],
    ['replicas 1.5', { replicas: 1.5, timeoutMs: 100 }],
    ['replicas NaN', { replicas: Number.NaN, timeoutMs: 100 }],
    ['timeoutMs 0 (WAIT would block forever)', { replicas: 1, timeoutMs: 0 }],
    ['timeoutMs -1', { replicas: 1, timeoutMs: -1 }],
    ['timeoutMs Infinity', { replicas: 1, timeoutMs: Number.POSITIVE_INFINITY }],
    ['timeoutMs NaN', { replicas: 1, timeoutMs: Number.NaN }],
    ['not an object', 1 as unknown as RedisReplicationOptions],
  ])('refuses %s', (_, replication) => {
    expect(() => redisStore({ client: fake, replication })).toThrow(ConfigError);
  });

  it('refuses a client it cannot send WAIT through', () => {
    const noPipeline = { evalsha: async () => null, eval: async () => null } as unknown as RedisClientLike;
    expect(() => redisStore({ client: noPipeline, replication: ON })).toThrow(ConfigError);
    expect(() => redisStore({ client: noPipeline })).not.toThrow();
  });
});

describe('redis store with replication on a primary and one replica', () => {
  let redis: ReplicatedRedis;
  let admin: Redis;
  let replica: Redis;
  const opened: Array<() => Promise<unknown>> = [];

  beforeAll(async () => {
    redis = await startReplicatedPrimary({ ports: [PRIMARY, REPLICA] });
    admin = await ioredis(PRIMARY);
    replica = await ioredis(REPLICA);
  });
  afterAll(async () => {
    for (const close of opened) await close().catch(() => {});
    await admin?.quit().catch(() => {});
    await replica?.quit().catch(() => {});
    await redis?.stop();
  });

  const clients: Record<string, () => Promise<RedisClientLike>> = {
    ioredis: async () => {
      const c = await ioredis(PRIMARY);
      opened.push(() => c.quit());
      return c;
    },
    'node-redis': async () => {
      const c = await nodeRedis(PRIMARY);
      opened.push(() => c.close());
      return c;
    },
  };

  describe.each(Object.keys(clients))('through %s', (kind) => {
    let client: RedisClientLike;
    let plain: RedisStore;
    const prefix = newPrefix(kind);
    const store = (replication: RedisReplicationOptions, more: { coalesce?: boolean } = {}): RedisStore =>
      redisStore({ client, prefix, replication, replayCache: false, ...more });

    beforeAll(async () => {
      client = await clients[kind]!();
      plain = redisStore({ client, prefix, replayCache: false });
    });

    it('answers a claim and a completion only once the replica has them', async () => {
      const s = store(ON);
      const id = newId();
      const claim = await s.claim(id, INPUT);
      if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
      // Read at once on the replica: WAIT already saw it there.
      expect(await replica.hget(s.keyOf(id), 's')).toBe('p');
      expect(await s.complete(id, claim.token, 'done', 60_000)).toBe(true);
      expect(await replica.hget(s.keyOf(id), 's')).toBe('c');
      expect(await s.renew(id, claim.token, 30_000)).toBe(false);
      expect((await s.claim(id, INPUT)).status).toBe('completed');
    });

    it.each([true, false])('sends one WAIT for all the writes of one turn (coalesce %s)', async (coalesce) => {
      const s = store(ON, { coalesce });
      await s.claim(newId(), INPUT); // scripts cached
      const ids = Array.from({ length: 25 }, newId);
      const before = await waits(admin);
      const claims = await Promise.all(ids.map((id) => s.claim(id, INPUT)));
      expect((await waits(admin)) - before).toBe(1);
      const tokens = claims.map((c) => (c.status === 'acquired' ? c.token : ''));
      const middle = await waits(admin);
      const done = await Promise.all(ids.map((id, i) => s.complete(id, tokens[i]!, 'x', 60_000)));
      expect(done.every(Boolean)).toBe(true);
      expect((await waits(admin)) - middle).toBe(1);
      for (const id of ids) expect(await replica.hget(s.keyOf(id), 's')).toBe('c');
    });

    it('sends no WAIT for releases alone', async () => {
      const s = store(ON);
      const claim = await s.claim(newId(), INPUT);
      const id = newId();
      const mine = await s.claim(id, INPUT);
      if (mine.status !== 'acquired' || claim.status !== 'acquired') throw new Error('expected acquired');
      const before = await waits(admin);
      expect(await s.release(id, mine.token)).toBe(true);
      expect((await waits(admin)) - before).toBe(0);
    });

    it('releases and refuses a claim the replicas did not acknowledge', async () => {
      const s = store(SHORT);
      const id = newId();
      const started = Date.now();
      const error = await s.claim(id, INPUT).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(StoreUnavailableError);
      expect(String((error as Error).message)).toMatch(/1 of 2 replicas acknowledged the claim/);
      expect(Date.now() - started).toBeGreaterThanOrEqual(90);
      // The release follows the refusal: the id is free for the next try.
      for (let i = 0; i < 50 && (await plain.get(id)) !== null; i++) await sleep(20);
      expect(await plain.get(id)).toBeNull();
      expect((await plain.claim(id, INPUT)).status).toBe('acquired');
    });

    it('answers replays and in-progress claims even when the replicas are short', async () => {
      const s = store(SHORT);
      const busy = newId();
      const held = await plain.claim(busy, INPUT);
      expect(held.status).toBe('acquired');
      expect((await s.claim(busy, INPUT)).status).toBe('in_progress');
      const done = newId();
      const c = await plain.claim(done, INPUT);
      if (c.status !== 'acquired') throw new Error('expected acquired');
      await plain.complete(done, c.token, 'kept', 60_000);
      const replay = await s.claim(done, INPUT);
      expect(replay.status === 'completed' && replay.record.outcome).toBe('kept');
    });

    it('refuses a completion or a renewal the replicas did not acknowledge; the same completion sent again answers true', async () => {
      const s = store(SHORT);
      const id = newId();
      const claim = await plain.claim(id, INPUT);
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      await expect(s.renew(id, claim.token, 30_000)).rejects.toBeInstanceOf(StoreUnavailableError);
      await expect(s.complete(id, claim.token, 'outcome', 60_000)).rejects.toBeInstanceOf(StoreUnavailableError);
      // It did land on the primary: sent again, it answers true and writes nothing.
      const expiry = await admin.pexpiretime(s.keyOf(id));
      await sleep(5);
      expect(await plain.complete(id, claim.token, 'outcome', 60_000)).toBe(true);
      expect(await admin.pexpiretime(s.keyOf(id))).toBe(expiry);
      expect(await plain.complete(id, claim.token, 'another outcome', 60_000)).toBe(false);
      expect(await plain.complete(id, 'another token', 'outcome', 60_000)).toBe(false);
      // Fenced answers wrote nothing and stand: no refusal for them.
      expect(await s.complete(id, 'another token', 'outcome', 60_000)).toBe(false);
      expect(await s.release(id, claim.token)).toBe(false);
    });

    it('refuses claims while the replica lags, and takes them again when it catches up', async () => {
      const s = store({ replicas: 1, timeoutMs: 150 });
      const asleep = replica.call('DEBUG', 'SLEEP', '0.6');
      await sleep(50);
      await expect(s.claim(newId(), INPUT)).rejects.toBeInstanceOf(StoreUnavailableError);
      await asleep;
      expect((await s.claim(newId(), INPUT)).status).toBe('acquired');
    });

    it('reloads a flushed script and still waits for the replica', async () => {
      const s = store(ON);
      await admin.script('FLUSH');
      const id = newId();
      const claim = await s.claim(id, INPUT);
      expect(claim.status).toBe('acquired');
      expect(await replica.hget(s.keyOf(id), 's')).toBe('p');
    });

    it('with the engine: 503 while the replica lags; a completion retried until it is acknowledged', async () => {
      const engine = new Engine({ store: store({ replicas: 1, timeoutMs: 100 }), leaseMs: 10_000 });
      const asleep = replica.call('DEBUG', 'SLEEP', '0.5');
      await sleep(50);
      const refused = await engine.begin({ id: newId(), fingerprint: FP });
      expect(refused.kind).toBe('unavailable');
      if (refused.kind === 'unavailable') expect(refused.error.status).toBe(503);
      await asleep;

      const id = newId();
      const begun = await engine.begin({ id, fingerprint: FP });
      if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
      const lagging = replica.call('DEBUG', 'SLEEP', '0.5');
      await sleep(50);
      const errors: unknown[] = [];
      engine.on('storeError', (e) => errors.push(e.error));
      expect(await begun.claim.settle({ kind: 'complete', outcome: 'paid' })).toBe('stored');
      await lagging;
      expect(errors.length).toBeGreaterThan(0); // refused at first, then stored with the same token
      expect(await replica.hget(plain.keyOf(id), 's')).toBe('c');
      // Its session's heartbeats (WAITed for too) would otherwise go on beside the next tests' WAIT counts.
      await engine.close();
    });

    it('counts a session heartbeat only once the replica has it; an end sends no WAIT', async () => {
      const session = crypto.randomUUID();
      await store(ON).sessions.heartbeat(session, 60_000);
      expect(await replica.exists(plain.sessionKeyOf(session))).toBe(1);
      // A heartbeat a failover could lose would let others take over live claims: refused.
      await expect(store(SHORT).sessions.heartbeat(session, 60_000)).rejects.toThrow(/replicas acknowledged the session heartbeat/);
      const before = await waits(admin);
      await store(ON).sessions.end(session);
      expect((await waits(admin)) - before).toBe(0);
      expect(await plain.sessions.alive(session)).toBe(false);
    });

    it('takes over from a dead session under the same WAIT rules as any claim', async () => {
      const dead = crypto.randomUUID();
      const id = newId();
      expect((await plain.claim(id, { ...INPUT, owner: dead })).status).toBe('acquired');
      // Not acknowledged: released and refused, like any claim.
      await expect(store(SHORT).claim(id, { ...INPUT, owner: crypto.randomUUID(), takeoverFrom: dead })).rejects.toBeInstanceOf(
        StoreUnavailableError,
      );
      for (let i = 0; i < 50 && (await plain.get(id)) !== null; i++) await sleep(20);
      expect(await plain.get(id)).toBeNull();
      // Acknowledged: the replica has the new owner as soon as the claim is answered.
      expect((await plain.claim(id, { ...INPUT, owner: dead })).status).toBe('acquired');
      const heir = crypto.randomUUID();
      const taken = await store(ON).claim(id, { ...INPUT, owner: heir, takeoverFrom: dead });
      expect(taken).toMatchObject({ status: 'acquired', takeover: true });
      expect(await replica.hget(plain.keyOf(id), 'w')).toBe(heir);
    });
  });
});
