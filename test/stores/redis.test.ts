/**
 * The Redis store against the real server on 127.0.0.1:6379 (REDIS_URL
 * overrides), through ioredis and node-redis: the conformance suite, the key
 * layout, and the round trips each operation costs, counted with MONITOR.
 */
import { randomBytes } from 'node:crypto';
import { Redis } from 'ioredis';
import type { ClaimResult } from 'oncely';
import { ConfigError } from '../../src/errors/index.js';
import { type RedisClientLike, type RedisStore, type RedisStoreOptions, redisStore } from 'oncely/stores/redis';
import { defineStoreConformance } from 'oncely/testing';
import { createClient } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const FP = 'v1:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc';
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(32).toString('hex');
const newPrefix = (what: string): string => `oncely-test-${what}-${randomBytes(6).toString('hex')}`;
const INPUT = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };

/** Claim a new id and complete it with `outcome`, kept `ttlMs`: a record ready to replay. */
async function completed(store: RedisStore, outcome: string, ttlMs = 60_000): Promise<string> {
  const id = newId();
  const claim = await store.claim(id, INPUT);
  if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
  expect(await store.complete(id, claim.token, outcome, ttlMs)).toBe(true);
  return id;
}

type NodeRedis = ReturnType<typeof createClient>;

/** An ioredis connection set to fail fast, as the docs recommend. */
async function ioredis(): Promise<Redis> {
  const client = new Redis(URL, { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true });
  await client.connect();
  return client;
}

/** A node-redis connection set to fail fast, as the docs recommend. */
async function nodeRedis(): Promise<NodeRedis> {
  const client = createClient({ url: URL, disableOfflineQueue: true });
  client.on('error', () => {}); // node-redis throws on an unhandled 'error' event
  await client.connect();
  return client;
}

/** Delete every key under `prefix` (records expire anyway; this keeps the shared server tidy). */
async function cleanup(admin: Redis, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await admin.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
    cursor = next;
    if (keys.length > 0) await admin.del(...keys);
  } while (cursor !== '0');
}

const clients = {
  ioredis: { open: ioredis, close: async (c: Redis) => void (await c.quit()) },
  'node-redis': { open: nodeRedis, close: async (c: NodeRedis) => void (await c.close()) },
} as const;

// The suite through each client, and once more with each write its own
// script and no replay cache.
const suites: Array<{
  name: string;
  open: () => Promise<RedisClientLike>;
  close: (c: never) => Promise<void>;
  options?: Partial<RedisStoreOptions>;
}> = [
  { name: 'ioredis', ...clients.ioredis },
  { name: 'node-redis', ...clients['node-redis'] },
  { name: 'ioredis, coalesce and replay cache off', ...clients.ioredis, options: { coalesce: false, replayCache: false } },
];

for (const { name, open, close, options } of suites) {
  const prefix = newPrefix(name.replace(/\W+/g, '-'));
  const opened: RedisClientLike[] = [];
  const make = async () => {
    const client = await open();
    opened.push(client);
    return redisStore({ ...options, client, prefix });
  };
  defineStoreConformance(
    { describe, it, beforeAll, afterAll },
    {
      name: `redis (${name})`,
      store: make,
      anotherClient: make,
      teardown: async () => {
        const admin = await ioredis();
        await cleanup(admin, prefix);
        await admin.quit();
        for (const client of opened) await close(client as never);
      },
    },
  );
}

/**
 * Counts the commands the server receives under a key prefix, with MONITOR
 * on a dedicated connection. Robust while other test files share the server:
 * only commands naming our random prefix count, and a marker command after
 * each operation proves the feed has caught up before counting.
 */
async function commandCounter(prefix: string) {
  const base = new Redis(URL, { lazyConnect: true });
  await base.connect();
  const monitor = await base.monitor();
  const seen: string[][] = [];
  monitor.on('monitor', (_time: string, args: string[], source: string) => {
    // Commands a script runs are fed too, tagged "lua": they are not round trips.
    if (source !== 'lua' && args.some((a) => a.includes(prefix))) seen.push(args);
  });
  let markers = 0;
  const sync = async (): Promise<void> => {
    const marker = `${prefix}:marker:${markers++}`;
    await base.exists(marker);
    const deadline = Date.now() + 5000;
    while (!seen.some((args) => args.includes(marker))) {
      if (Date.now() > deadline) throw new Error('MONITOR feed did not catch up');
      await sleep(5);
    }
  };
  return {
    /** The commands (names, lower case) that `operation` sent. */
    async commands(operation: () => Promise<unknown>): Promise<string[]> {
      await sync();
      const start = seen.length;
      await operation();
      await sync();
      return seen
        .slice(start)
        .filter((args) => !args.some((a) => a.includes(':marker:')))
        .map((args) => String(args[0]).toLowerCase());
    },
    async close(): Promise<void> {
      monitor.disconnect();
      base.disconnect();
    },
  };
}

describe('redis store', () => {
  let admin: Redis;
  const prefix = newPrefix('layout');

  beforeAll(async () => {
    admin = await ioredis();
  });
  afterAll(async () => {
    await cleanup(admin, prefix);
    await admin.quit();
  });

  describe.each(Object.keys(clients))('round trips with %s', (kind) => {
    const rtPrefix = newPrefix(`rt-${kind}`);
    let client: RedisClientLike;
    let counter: Awaited<ReturnType<typeof commandCounter>>;

    beforeAll(async () => {
      client = kind === 'ioredis' ? await ioredis() : await nodeRedis();
      counter = await commandCounter(rtPrefix);
    });
    afterAll(async () => {
      await counter.close();
      await cleanup(admin, rtPrefix);
      if (kind === 'ioredis') await (client as Redis).quit();
      else await (client as NodeRedis).close();
    });

    it('sends one EVALSHA per operation once the scripts are cached', async () => {
      const store = redisStore({ client, prefix: rtPrefix });
      const input = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
      // Warm the server's script cache (a cold server costs one extra EVAL per script).
      const warm = newId();
      const w = await store.claim(warm, input);
      if (w.status !== 'acquired') throw new Error('expected acquired');
      await store.renew(warm, w.token, 30_000);
      await store.complete(warm, w.token, 'x', 60_000);
      await store.release(warm, 'nope');
      await store.get(warm);
      await store.delete(warm);
      const session = crypto.randomUUID();
      await store.sessions.alive(session);

      const id = newId();
      let token = '';
      const measured: Record<string, string[]> = {};
      measured['claim (new id)'] = await counter.commands(async () => {
        const claim = await store.claim(id, input);
        if (claim.status !== 'acquired') throw new Error('expected acquired');
        token = claim.token;
      });
      measured['claim (in progress)'] = await counter.commands(() => store.claim(id, input));
      measured.renew = await counter.commands(() => store.renew(id, token, 30_000));
      measured.get = await counter.commands(() => store.get(id));
      measured.complete = await counter.commands(() => store.complete(id, token, '{"status":201}', 60_000));
      measured['claim (completed id)'] = await counter.commands(async () => {
        expect((await store.claim(id, input)).status).toBe('completed');
      });
      const other = newId();
      const o = await store.claim(other, input);
      if (o.status !== 'acquired') throw new Error('expected acquired');
      measured.release = await counter.commands(() => store.release(other, o.token));
      measured.delete = await counter.commands(() => store.delete(id));
      measured['claimMany (3 ids)'] = await counter.commands(async () => {
        const results = await store.claimMany!([newId(), newId(), newId()], input);
        expect(results.map((r) => r.status)).toEqual(['acquired', 'acquired', 'acquired']);
      });
      measured['session heartbeat'] = await counter.commands(() => store.sessions.heartbeat(session, 1_000));
      measured['session alive'] = await counter.commands(async () => expect(await store.sessions.alive(session)).toBe(true));
      const owned = newId();
      measured['claim with an owner (new id)'] = await counter.commands(() => store.claim(owned, { ...input, owner: session }));
      measured['claim answering its owner (in progress)'] = await counter.commands(async () => {
        expect(await store.claim(owned, { ...input, owner: 'another session' })).toMatchObject({ status: 'in_progress', owner: session });
      });
      measured['session end'] = await counter.commands(() => store.sessions.end(session));

      for (const [operation, commands] of Object.entries(measured)) {
        expect({ operation, commands }).toEqual({ operation, commands: ['evalsha'] });
      }
    });

    it('sends the writes asked for in one turn of the event loop as one script, in order', async () => {
      const store = redisStore({ client, prefix: rtPrefix });
      const input = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
      const ids = Array.from({ length: 20 }, newId);
      let claims: Awaited<ReturnType<typeof store.claim>>[] = [];
      // 20 claims, two of them of one id: the second meets the first inside the script.
      const claimed = await counter.commands(async () => {
        claims = await Promise.all([...ids, ids[0]!].map((id) => store.claim(id, input)));
      });
      expect(claimed).toEqual(['evalsha']);
      expect(claims.map((c) => c.status)).toEqual([...ids.map(() => 'acquired'), 'in_progress']);
      const tokens = claims.slice(0, ids.length).map((c) => (c.status === 'acquired' ? c.token : ''));
      // Completes, a renew and a stale release in one turn: still one script, each answered on its own.
      let answers: boolean[] = [];
      const settled = await counter.commands(async () => {
        answers = await Promise.all([
          ...ids.slice(1).map((id, i) => store.complete(id, tokens[i + 1]!, `outcome ${i}`, 60_000)),
          store.renew(ids[0]!, tokens[0]!, 30_000),
          store.release(ids[0]!, 'not-the-token'),
        ]);
      });
      expect(settled).toEqual(['evalsha']);
      expect(answers).toEqual([...ids.slice(1).map(() => true), true, false]);
      const replay = await store.get(ids[5]!);
      expect(replay).toMatchObject({ state: 'completed', outcome: 'outcome 4' });
    });

    it('sends a session heartbeat asked for in the same turn as claims in their script', async () => {
      const store = redisStore({ client, prefix: rtPrefix });
      const session = crypto.randomUUID();
      const commands = await counter.commands(() =>
        Promise.all([store.claim(newId(), INPUT), store.sessions.heartbeat(session, 1_000), store.claim(newId(), INPUT)]),
      );
      expect(commands).toEqual(['evalsha']);
      expect(await store.sessions.alive(session)).toBe(true);
      await store.sessions.end(session);
    });

    it('sends each write alone when coalescing is off', async () => {
      const store = redisStore({ client, prefix: rtPrefix, coalesce: false });
      const input = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
      const commands = await counter.commands(() => Promise.all([newId(), newId(), newId()].map((id) => store.claim(id, input))));
      expect(commands).toEqual(['evalsha', 'evalsha', 'evalsha']);
    });

    it('answers the copies of a replayed request from its replay cache until the entry ages out', async () => {
      const store = redisStore({ client, prefix: rtPrefix, replayCache: { maxAgeMs: 400 } });
      const input = INPUT;
      const id = await completed(store, 'the answer');
      // The first replay asks Redis (a fresh completion is never cached).
      expect(await counter.commands(async () => expect((await store.claim(id, input)).status).toBe('completed'))).toEqual(['evalsha']);
      const copies = await counter.commands(async () => {
        for (let i = 0; i < 10; i++) {
          const again = await store.claim(id, input);
          expect(again).toMatchObject({ status: 'completed', record: { outcome: 'the answer', fingerprint: FP } });
        }
        // Another body meets the stored fingerprint, from the cache too (the engine answers 422).
        const other = await store.claim(id, { ...input, fingerprint: 'v1:other' });
        expect(other).toMatchObject({ status: 'completed', record: { fingerprint: FP } });
      });
      expect(copies).toEqual([]);
      await sleep(450);
      expect(await counter.commands(() => store.claim(id, input))).toEqual(['evalsha']);
    });

    it('asks Redis for every replay without a replay cache', async () => {
      const store = redisStore({ client, prefix: rtPrefix, replayCache: false });
      const input = INPUT;
      const id = await completed(store, 'x');
      const commands = await counter.commands(async () => {
        for (let i = 0; i < 3; i++) expect((await store.claim(id, input)).status).toBe('completed');
      });
      expect(commands).toEqual(['evalsha', 'evalsha', 'evalsha']);
    });
  });

  describe.each(Object.keys(clients))('replay cache and batches with %s', (kind) => {
    const own = newPrefix(`rc-${kind}`);
    let client: RedisClientLike;

    beforeAll(async () => {
      client = kind === 'ioredis' ? await ioredis() : await nodeRedis();
    });
    afterAll(async () => {
      await cleanup(admin, own);
      if (kind === 'ioredis') await (client as Redis).quit();
      else await (client as NodeRedis).close();
    });

    it('does not cache a replay whose reply arrives after delete of its id', async () => {
      // Without coalescing the claim goes out at once, ahead of the delete:
      // Redis answers it "completed", then deletes the record.
      const store = redisStore({ client, prefix: own, coalesce: false });
      const id = await completed(store, 'deleted later');
      const claim = store.claim(id, INPUT);
      const deleted = store.delete(id);
      expect((await claim).status).toBe('completed');
      expect(await deleted).toBe(true);
      expect((await store.claim(id, INPUT)).status).toBe('acquired');
    });

    it('does not cache a replay whose batch was in flight when its id was deleted', async () => {
      const store = redisStore({ client, prefix: own });
      const id = await completed(store, 'deleted later');
      const claim = store.claim(id, INPUT);
      // The batch goes out at the end of this turn; delete right after it, before the reply.
      const deleted = new Promise<boolean>((resolve, reject) => setImmediate(() => store.delete(id).then(resolve, reject)));
      expect((await claim).status).toBe('completed');
      expect(await deleted).toBe(true);
      expect((await store.claim(id, INPUT)).status).toBe('acquired');
    });

    it('fails only the caller whose key is of the wrong type; the rest of its batch is claimed and held', async () => {
      const store = redisStore({ client, prefix: own });
      const good = Array.from({ length: 5 }, newId);
      const bad = newId();
      // Someone made a list where the record of `bad` belongs.
      await admin.rpush(store.keyOf(bad), 'not a record');
      const ids = [good[0]!, good[1]!, bad, good[2]!, good[3]!, good[4]!];
      // One turn of the event loop: one script for all six.
      const settled = await Promise.allSettled(ids.map((id) => store.claim(id, INPUT)));
      expect(settled.map((s) => s.status)).toEqual(['fulfilled', 'fulfilled', 'rejected', 'fulfilled', 'fulfilled', 'fulfilled']);
      expect(String((settled[2] as PromiseRejectedResult).reason?.message)).toMatch(/WRONGTYPE/);
      // Every good claim is acquired by a token its caller holds: it can complete.
      for (const [i, id] of ids.entries()) {
        if (id === bad) continue;
        const result = (settled[i] as PromiseFulfilledResult<ClaimResult>).value;
        if (result.status !== 'acquired') throw new Error(`expected acquired, got ${result.status}`);
        expect(await store.complete(id, result.token, `done ${i}`, 60_000)).toBe(true);
      }
      expect(await admin.type(store.keyOf(bad))).toBe('list');
      expect(await admin.lrange(store.keyOf(bad), 0, -1)).toEqual(['not a record']);
    });

    it('fails a claimMany with a key of the wrong type as a whole and leaves none of its ids claimed', async () => {
      const store = redisStore({ client, prefix: own });
      const bad = newId();
      await admin.rpush(store.keyOf(bad), 'not a record');
      const mine = [newId(), bad, newId()];
      const neighbour = newId();
      // A claim of another caller in the same turn shares the script and is unaffected.
      const [many, other] = await Promise.allSettled([store.claimMany!(mine, INPUT), store.claim(neighbour, INPUT)]);
      expect(many.status).toBe('rejected');
      expect(String((many as PromiseRejectedResult).reason?.message)).toMatch(/WRONGTYPE/);
      expect(other).toMatchObject({ status: 'fulfilled', value: { status: 'acquired' } });
      // The batch's own claims were undone: nobody holds them, so they run again at once.
      expect(await store.get(mine[0]!)).toBeNull();
      expect(await store.get(mine[2]!)).toBeNull();
      expect((await store.claimMany!([mine[0]!, mine[2]!], INPUT)).map((r) => r.status)).toEqual(['acquired', 'acquired']);
    });
  });

  describe('record layout and clock', () => {
    let store: ReturnType<typeof redisStore>;
    beforeAll(() => {
      store = redisStore({ client: admin, prefix });
    });

    it('keeps one hash per record under <prefix>:{<id>}, with the claim TTL then the completion TTL', async () => {
      const id = newId();
      const key = `${prefix}:{${id}}`;
      expect(store.keyOf(id)).toBe(key);
      expect(store.cluster).toBe(false);
      const claim = await store.claim(id, { fingerprint: FP, leaseMs: 5_000, ttlMs: 120_000 });
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      expect(await admin.type(key)).toBe('hash');
      const claimTtl = await admin.pttl(key);
      expect(claimTtl).toBeGreaterThan(110_000);
      expect(claimTtl).toBeLessThanOrEqual(120_000);
      expect(await store.complete(id, claim.token, 'done', 3_600_000)).toBe(true);
      const doneTtl = await admin.pttl(key);
      expect(doneTtl).toBeGreaterThan(3_590_000);
      expect(doneTtl).toBeLessThanOrEqual(3_600_000);
      const record = await store.get(id);
      expect(record?.state).toBe('completed');
      // expiresAt is the key's own expiry, on the server clock.
      expect(Math.abs(record!.expiresAt - (await admin.pexpiretime(key)))).toBe(0);
    });

    it('keeps an in-progress record at least as long as its lease', async () => {
      const id = newId();
      await store.claim(id, { fingerprint: FP, leaseMs: 90_000, ttlMs: 1_000 });
      expect(await admin.pttl(store.keyOf(id))).toBeGreaterThan(80_000);
      const record = await store.get(id);
      expect(record?.state === 'in_progress' && record.expiresAt).toBe(record?.state === 'in_progress' && record.leaseUntil);
    });

    it('takes deadlines from the Redis clock', async () => {
      const [seconds, micros] = await admin.time();
      const serverNow = Number(seconds) * 1000 + Math.floor(Number(micros) / 1000);
      const id = newId();
      const claim = await store.claim(id, { fingerprint: FP, leaseMs: 10_000, ttlMs: 60_000 });
      if (claim.status !== 'acquired') throw new Error('expected acquired');
      expect(claim.leaseUntil - serverNow).toBeGreaterThanOrEqual(10_000);
      expect(claim.leaseUntil - serverNow).toBeLessThan(11_000);
      const busy = await store.claim(id, { fingerprint: FP, leaseMs: 10_000, ttlMs: 60_000 });
      if (busy.status !== 'in_progress') throw new Error('expected in_progress');
      expect(busy.now - serverNow).toBeGreaterThanOrEqual(0);
      expect(busy.now - serverNow).toBeLessThan(1_000);
    });

    it('never confuses a null fingerprint with any string', async () => {
      for (const [first, second] of [
        [null, '-'],
        [null, ''],
        ['', null],
        ['-', null],
      ] as const) {
        const id = newId();
        const claim = await store.claim(id, { fingerprint: first, leaseMs: 50, ttlMs: 60_000 });
        expect(claim.status).toBe('acquired');
        await sleep(120);
        const other = await store.claim(id, { fingerprint: second, leaseMs: 50, ttlMs: 60_000 });
        expect(other.status).toBe('in_progress');
        if (other.status === 'in_progress') expect(other.fingerprint).toBe(first);
        expect((await store.get(id))?.fingerprint).toBe(first);
      }
    });

    it('answers acquired to its own claim run twice (a client resending after a lost reply)', async () => {
      // A client that runs every script twice and returns the second reply,
      // as ioredis does when it resends unanswered commands after a reconnect.
      const twice = {
        evalsha: async (sha: string, n: number, ...rest: string[]) => {
          await admin.evalsha(sha, n, ...rest);
          return admin.evalsha(sha, n, ...rest);
        },
        eval: async (script: string, n: number, ...rest: string[]) => {
          await admin.eval(script, n, ...rest);
          return admin.eval(script, n, ...rest);
        },
      };
      const resending = redisStore({ client: twice, prefix });
      const id = newId();
      const claim = await resending.claim(id, { fingerprint: FP, leaseMs: 50, ttlMs: 60_000 });
      if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
      expect(claim.takeover).toBe(false);
      await sleep(120);
      const taken = await resending.claim(id, { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 });
      if (taken.status !== 'acquired') throw new Error(`expected acquired, got ${taken.status}`);
      expect(taken.takeover).toBe(true);
      expect(taken.leaseUntil).toBeGreaterThan(Date.now() + 20_000);
      expect(await store.complete(id, claim.token, 'stale', 60_000)).toBe(false);
      expect(await store.complete(id, taken.token, 'fresh', 60_000)).toBe(true);
    });

    it('falls back to EVAL on NOSCRIPT however the client wraps it, and only then', async () => {
      const noScript = 'NOSCRIPT No matching script. Please use EVAL.';
      const replyError = Object.assign(new Error(noScript), { name: 'ReplyError' });
      // What a client can throw for a server without the script: Redis's own
      // reply; ioredis Cluster after a failover (the reply inside its message);
      // ioredis ClusterAllFailedError (the reply as lastNodeError); an error
      // with the reply as its cause. And one that is not NOSCRIPT at all.
      const shapes: Array<[string, () => Error, boolean]> = [
        ['plain reply', () => replyError, true],
        ['cluster redirections', () => new Error(`Too many Cluster redirections. Last error: ReplyError: ${noScript}`), true],
        ['lastNodeError', () => Object.assign(new Error('Failed to refresh slots cache.'), { lastNodeError: replyError }), true],
        ['cause', () => new Error('script failed', { cause: replyError }), true],
        ['another error', () => new Error('ERR something else'), false],
      ];
      for (const [shape, error, fallsBack] of shapes) {
        let evals = 0;
        const failingOver = {
          isCluster: false,
          evalsha: async () => {
            throw error();
          },
          eval: async (script: string, n: number, ...rest: string[]) => {
            evals++;
            return admin.eval(script, n, ...rest);
          },
        };
        const store = redisStore({ client: failingOver, prefix });
        const claim = store.claim(newId(), INPUT);
        if (fallsBack) expect({ shape, status: (await claim).status }).toEqual({ shape, status: 'acquired' });
        else await expect(claim).rejects.toThrow('ERR something else');
        expect({ shape, evals }).toEqual({ shape, evals: fallsBack ? 1 : 0 });
      }
    });

    it('claims duplicate ids in one batch once', async () => {
      const id = newId();
      const results = await store.claimMany!([id, id], { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 });
      expect(results.map((r) => r.status)).toEqual(['acquired', 'in_progress']);
    });

    it('leaves a record of another prefix alone', async () => {
      const id = newId();
      const mine = await store.claim(id, { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 });
      const neighbour = redisStore({ client: admin, prefix: `${prefix}-other` });
      expect((await neighbour.claim(id, { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 })).status).toBe('acquired');
      if (mine.status === 'acquired') expect(await neighbour.release(id, mine.token)).toBe(false);
      await cleanup(admin, `${prefix}-other`);
    });

    it('runs an id again once its record expired, even after replaying it from the cache', async () => {
      const input = INPUT;
      const id = await completed(store, 'short-lived', 300);
      expect((await store.claim(id, input)).status).toBe('completed');
      expect((await store.claim(id, input)).status).toBe('completed');
      await sleep(400);
      expect((await store.claim(id, input)).status).toBe('acquired');
    });

    it('forgets a cached replay when the record is deleted through the store', async () => {
      const input = INPUT;
      const id = await completed(store, 'x');
      expect((await store.claim(id, input)).status).toBe('completed');
      expect(await store.delete(id)).toBe(true);
      expect((await store.claim(id, input)).status).toBe('acquired');
    });

    it('keeps at most maxEntries replays, dropping the oldest first', async () => {
      const small = redisStore({ client: admin, prefix, replayCache: { maxEntries: 2 } });
      const input = INPUT;
      const ids: string[] = [];
      for (let i = 0; i < 3; i++) {
        const id = await completed(small, `outcome ${i}`);
        expect((await small.claim(id, input)).status).toBe('completed');
        ids.push(id);
      }
      // Deleted behind the store's back: only an id still in the cache replays.
      for (const id of ids) await admin.del(small.keyOf(id));
      expect((await small.claim(ids[0]!, input)).status).toBe('acquired');
      expect((await small.claim(ids[2]!, input)).status).toBe('completed');
    });

    it('refuses a prefix with a brace and a client it does not recognise', () => {
      expect(() => redisStore({ client: admin, prefix: 'a{b}' })).toThrow(ConfigError);
      expect(() => redisStore({ client: {} as RedisClientLike })).toThrow(ConfigError);
    });
  });
});
