/**
 * Process sessions in the Redis store, on the real standalone server
 * (127.0.0.1:6379, REDIS_URL overrides) and the three-master cluster
 * (127.0.0.1:7000-7002, test/support/redis-cluster.ts), through ioredis and
 * node-redis: the session key and its TTL, the owner stored with a claim,
 * takeoverFrom at the store, and through engines: a record held by a
 * SIGKILLed process taken over within 2 s, a live owner's slow claim kept,
 * a stalled process's claim taken over and its completion fenced, and what
 * the owner costs per claim (MEMORY USAGE).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Cluster, Redis } from 'ioredis';
import { type Claim, type ClaimResult, Engine } from 'oncely';
import { type RedisClientLike, type RedisStore, redisStore } from 'oncely/stores/redis';
import { createClient, createCluster } from 'redis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REDIS_CLUSTER_NODES, startRedisCluster, stopRedisCluster } from '../support/redis-cluster.js';

const URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const ROOT = join(import.meta.dirname, '..', '..');
const FP = 'v1:5555555555555555555555555555555555555555555555555555555555555555';
const INPUT = { fingerprint: FP, leaseMs: 30_000, ttlMs: 60_000 };
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const newId = (): string => randomBytes(32).toString('hex');
const newPrefix = (what: string): string => `oncely-test-sessions-${what}-${randomBytes(6).toString('hex')}`;
const newSession = (): string => crypto.randomUUID();

// --- Clients -----------------------------------------------------------------

type Admin = Redis | Cluster;

interface Kind {
  /** ioredis or node-redis. */
  readonly library: 'ioredis' | 'node-redis';
  readonly cluster: boolean;
  open(): Promise<{ client: RedisClientLike; close(): Promise<void> }>;
}

const KINDS: Record<string, Kind> = {
  ioredis: {
    library: 'ioredis',
    cluster: false,
    async open() {
      const client = new Redis(URL, { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true });
      await client.connect();
      return { client, close: async () => void (await client.quit()) };
    },
  },
  'node-redis': {
    library: 'node-redis',
    cluster: false,
    async open() {
      const client = createClient({ url: URL, disableOfflineQueue: true });
      client.on('error', () => {});
      await client.connect();
      return { client, close: async () => void (await client.close()) };
    },
  },
  'ioredis Cluster': {
    library: 'ioredis',
    cluster: true,
    async open() {
      const client = new Cluster(REDIS_CLUSTER_NODES, {
        enableOfflineQueue: false,
        lazyConnect: true,
        redisOptions: { maxRetriesPerRequest: 0 },
      });
      await client.connect();
      return { client, close: async () => void (await client.quit()) };
    },
  },
  'node-redis createCluster': {
    library: 'node-redis',
    cluster: true,
    async open() {
      const client = createCluster({
        rootNodes: REDIS_CLUSTER_NODES.map(({ host, port }) => ({ url: `redis://${host}:${port}` })),
        defaults: { disableOfflineQueue: true },
      });
      client.on('error', () => {});
      await client.connect();
      return { client, close: async () => void (await client.close()) };
    },
  },
};

async function openAdmin(cluster: boolean): Promise<Admin> {
  if (!cluster) {
    const client = new Redis(URL, { lazyConnect: true });
    await client.connect();
    return client;
  }
  const client = new Cluster(REDIS_CLUSTER_NODES, { lazyConnect: true });
  await client.connect();
  return client;
}

async function cleanup(admin: Admin, prefix: string): Promise<void> {
  const nodes = admin instanceof Cluster ? admin.nodes('master') : [admin];
  for (const node of nodes) {
    let cursor = '0';
    do {
      const [next, keys] = await node.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
      cursor = next;
      // One DEL per key: on a cluster they live in different slots.
      await Promise.all(keys.map((key) => admin.del(key)));
    } while (cursor !== '0');
  }
}

// --- A process that holds a claim (then is killed, or stalls) -------------------

// Plain JS run by `node --import tsx`, which resolves `oncely` to the sources
// (`--conditions=source`), as the reference system is run by its tests.
const CHILD = `
import { Engine } from 'oncely';
import { redisStore } from 'oncely/stores/redis';
const { LIBRARY, CLUSTER, REDIS_URL, NODES, PREFIX, ID, FP, MODE, STALL_MS } = process.env;
const nodes = JSON.parse(NODES);
let client;
if (LIBRARY === 'ioredis') {
  const { Redis, Cluster } = await import('ioredis');
  client = CLUSTER === '1'
    ? new Cluster(nodes, { enableOfflineQueue: false, lazyConnect: true, redisOptions: { maxRetriesPerRequest: 0 } })
    : new Redis(REDIS_URL, { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true });
  await client.connect();
} else {
  const { createClient, createCluster } = await import('redis');
  client = CLUSTER === '1'
    ? createCluster({ rootNodes: nodes.map((n) => ({ url: 'redis://' + n.host + ':' + n.port })), defaults: { disableOfflineQueue: true } })
    : createClient({ url: REDIS_URL, disableOfflineQueue: true });
  client.on('error', () => {});
  await client.connect();
}
// Default engine settings: a 30 s lease, a 1 s session.
const engine = new Engine({ store: redisStore({ client, prefix: PREFIX }) });
const begun = await engine.begin({ id: ID, fingerprint: FP });
if (begun.kind !== 'run') {
  console.log('refused ' + begun.kind);
  process.exit(1);
}
console.log('claimed ' + engine.session.id);
if (MODE === 'stall') {
  await new Promise((resolve) => setTimeout(resolve, 300));
  console.log('stalling');
  // A synchronous pause: no heartbeat, no renewal, nothing else runs.
  const until = Date.now() + Number(STALL_MS);
  while (Date.now() < until) {}
  const settled = await begun.claim.settle({ kind: 'complete', outcome: 'from the stalled process' });
  console.log('settled ' + settled + ' lost ' + begun.claim.lost);
  process.exit(0);
}
setInterval(() => {}, 60_000); // hold the claim until killed
`;

const children = new Set<ChildProcess>();

interface Holder {
  child: ChildProcess;
  session: string;
  /** Resolves with the first output line matching `pattern`. */
  line(pattern: RegExp, ms?: number): Promise<string>;
}

/** Start a process that claims `id` with default engine settings and reports its session. */
async function holder(kind: Kind, prefix: string, id: string, mode: 'hold' | 'stall', stallMs = 0): Promise<Holder> {
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', '--input-type=module', '-e', CHILD], {
    cwd: ROOT,
    env: {
      ...process.env,
      LIBRARY: kind.library,
      CLUSTER: kind.cluster ? '1' : '0',
      REDIS_URL: URL,
      NODES: JSON.stringify(REDIS_CLUSTER_NODES),
      PREFIX: prefix,
      ID: id,
      FP,
      MODE: mode,
      STALL_MS: String(stallMs),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  let out = '';
  const waiters: Array<() => void> = [];
  const onData = (chunk: Buffer): void => {
    out += chunk.toString();
    for (const wake of waiters.splice(0)) wake();
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  child.on('exit', () => {
    for (const wake of waiters.splice(0)) wake();
  });
  const line = async (pattern: RegExp, ms = 45_000): Promise<string> => {
    // Generous: a cold tsx start on a loaded machine can take many seconds.
    const deadline = Date.now() + ms;
    for (;;) {
      const match = pattern.exec(out);
      if (match) return match[0];
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`child exited before ${pattern}:\n${out}`);
      if (Date.now() > deadline) throw new Error(`child did not print ${pattern} in ${ms} ms:\n${out}`);
      await new Promise<void>((resolve) => {
        waiters.push(resolve);
        setTimeout(resolve, 200);
      });
    }
  };
  const claimed = await line(/claimed (\S+)/);
  return { child, session: claimed.split(' ')[1]!, line };
}

function kill9(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    child.once('exit', () => resolve());
    child.kill('SIGKILL');
  });
}

/** Retry `begin` every 50 ms (as a retrying client would) until it runs; answers the claim and how long it took. */
async function retryUntilRun(engine: Engine, id: string, since: number, limitMs: number): Promise<{ claim: Claim; ms: number; tries: number }> {
  for (let tries = 1; ; tries++) {
    const begun = await engine.begin({ id, fingerprint: FP });
    if (begun.kind === 'run') return { claim: begun.claim, ms: performance.now() - since, tries };
    if (begun.kind !== 'in_flight') throw new Error(`expected in_flight or run, got ${begun.kind}`);
    if (performance.now() - since > limitMs) throw new Error(`not taken over within ${limitMs} ms`);
    await sleep(50);
  }
}

const takeovers: Array<{ kind: string; ms: number }> = [];

let clusterStarted = false;
beforeAll(async () => {
  await startRedisCluster();
  clusterStarted = true;
}, 60_000);

afterAll(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  if (clusterStarted) await stopRedisCluster();
  if (takeovers.length > 0) {
    const sorted = takeovers.map((t) => t.ms).sort((a, b) => a - b);
    console.log(
      `takeover after SIGKILL, ms (${sorted.length}): ${takeovers.map((t) => `${t.kind} ${Math.round(t.ms)}`).join(', ')}; ` +
        `median ${Math.round(sorted[Math.floor(sorted.length / 2)]!)}, max ${Math.round(sorted.at(-1)!)}`,
    );
  }
}, 60_000);

for (const [name, kind] of Object.entries(KINDS)) {
  describe(`redis sessions (${name})`, () => {
    const prefix = newPrefix(name.replace(/\W+/g, '-'));
    const closers: Array<() => Promise<void>> = [];
    let admin: Admin;
    let store: RedisStore;

    /** A store on a client of its own: its engines get a session of their own. */
    const another = async (): Promise<RedisStore> => {
      const { client, close } = await kind.open();
      closers.push(close);
      return redisStore({ client, prefix });
    };

    beforeAll(async () => {
      admin = await openAdmin(kind.cluster);
      store = await another();
    });
    afterAll(async () => {
      await cleanup(admin, prefix);
      for (const close of closers) await close().catch(() => {});
      await admin.quit();
    });

    it('keeps a session key alive for its TTL from each heartbeat; end deletes it', async () => {
      const session = newSession();
      const key = store.sessionKeyOf(session);
      expect(key).toBe(`${prefix}:session:{${session}}`);
      expect(store.cluster).toBe(kind.cluster);
      expect(await store.sessions.alive(session)).toBe(false);
      await store.sessions.heartbeat(session, 600);
      expect(await store.sessions.alive(session)).toBe(true);
      expect(await admin.type(key)).toBe('string');
      const ttl = await admin.pttl(key);
      expect(ttl).toBeGreaterThan(0);
      expect(ttl).toBeLessThanOrEqual(600);
      // Each heartbeat counts from itself: three beats 300 ms apart keep it past its first TTL.
      for (let i = 0; i < 3; i++) {
        await sleep(300);
        await store.sessions.heartbeat(session, 600);
        expect(await store.sessions.alive(session)).toBe(true);
      }
      // No more beats: it dies by itself (the server's clock, the key's TTL).
      await sleep(800);
      expect(await store.sessions.alive(session)).toBe(false);
      expect(await admin.exists(key)).toBe(0);
      await store.sessions.heartbeat(session, 60_000);
      expect(await store.sessions.alive(session)).toBe(true);
      await store.sessions.end(session);
      expect(await store.sessions.alive(session)).toBe(false);
      await store.sessions.end(session); // ending twice is harmless
    });

    it('stores the owner with a claim, answers it while in progress, and drops it on completion', async () => {
      const owner = newSession();
      const id = newId();
      const claim = await store.claim(id, { ...INPUT, owner });
      if (claim.status !== 'acquired') throw new Error(`expected acquired, got ${claim.status}`);
      expect(await admin.hget(store.keyOf(id), 'w')).toBe(owner);
      const busy = await store.claim(id, { ...INPUT, owner: newSession() });
      expect(busy).toMatchObject({ status: 'in_progress', owner, fingerprint: FP });
      const many = await store.claimMany!([id], { ...INPUT, owner: newSession() });
      expect(many[0]).toMatchObject({ status: 'in_progress', owner });
      expect(await store.complete(id, claim.token, 'done', 60_000)).toBe(true);
      expect(await admin.hget(store.keyOf(id), 'w')).toBeNull();
      // A claim without an owner stores none and answers none.
      const plain = newId();
      await store.claim(plain, INPUT);
      expect(await admin.hexists(store.keyOf(plain), 'w')).toBe(0);
      const answer = await store.claim(plain, INPUT);
      expect(answer.status).toBe('in_progress');
      expect('owner' in answer).toBe(false);
    });

    it('takes over from exactly the named owner whatever the lease, with the same fingerprint rule', async () => {
      const dead = newSession();
      const heir = newSession();
      const id = newId();
      const first = await store.claim(id, { ...INPUT, owner: dead });
      if (first.status !== 'acquired') throw new Error('expected acquired');
      // Another owner named, another fingerprint, or no takeoverFrom at all: the live lease stands.
      expect(await store.claim(id, { ...INPUT, owner: heir, takeoverFrom: newSession() })).toMatchObject({ status: 'in_progress', owner: dead });
      expect(await store.claim(id, { ...INPUT, fingerprint: 'v1:other', owner: heir, takeoverFrom: dead })).toMatchObject({
        status: 'in_progress',
        owner: dead,
      });
      expect(await store.claim(id, { ...INPUT, fingerprint: null, owner: heir, takeoverFrom: dead })).toMatchObject({ status: 'in_progress' });
      expect(await store.claim(id, { ...INPUT, owner: heir })).toMatchObject({ status: 'in_progress', owner: dead });

      const taken = await store.claim(id, { ...INPUT, leaseMs: 20_000, owner: heir, takeoverFrom: dead });
      if (taken.status !== 'acquired') throw new Error(`expected acquired, got ${taken.status}`);
      expect(taken.takeover).toBe(true);
      expect(taken.token).not.toBe(first.token);
      expect(await admin.hmget(store.keyOf(id), 'w', 'k', 't')).toEqual([heir, '1', taken.token]);
      // The dead owner is fenced.
      expect(await store.renew(id, first.token, 30_000)).toBe(false);
      expect(await store.complete(id, first.token, 'stale', 60_000)).toBe(false);
      expect(await store.release(id, first.token)).toBe(false);
      // The owner changed meanwhile: a second takeover from the dead owner is refused.
      expect(await store.claim(id, { ...INPUT, owner: newSession(), takeoverFrom: dead })).toMatchObject({ status: 'in_progress', owner: heir });
      expect(await store.complete(id, taken.token, 'fresh', 60_000)).toBe(true);
      // A completed record is replayed, whoever is named.
      const replay = await store.claim(id, { ...INPUT, owner: newSession(), takeoverFrom: heir });
      expect(replay.status === 'completed' && replay.record.outcome).toBe('fresh');
      // No record: an ordinary claim.
      const fresh = await store.claim(newId(), { ...INPUT, owner: heir, takeoverFrom: dead });
      expect(fresh).toMatchObject({ status: 'acquired', takeover: false });
    });

    it('forgets the dead owner when a claim without an owner takes over', async () => {
      const dead = newSession();
      const id = newId();
      await store.claim(id, { ...INPUT, owner: dead });
      const taken = await store.claim(id, { ...INPUT, takeoverFrom: dead });
      expect(taken).toMatchObject({ status: 'acquired', takeover: true });
      expect(await admin.hexists(store.keyOf(id), 'w')).toBe(0);
      expect(await store.claim(id, { ...INPUT, owner: newSession(), takeoverFrom: dead })).toMatchObject({ status: 'in_progress' });
    });

    it('takes over from a dead owner inside claimMany, and gives one winner among concurrent takeovers', async () => {
      const dead = newSession();
      const alive = newSession();
      const deadIds = Array.from({ length: 4 }, newId);
      const liveIds = Array.from({ length: 2 }, newId);
      for (const id of deadIds) await store.claim(id, { ...INPUT, owner: dead });
      for (const id of liveIds) await store.claim(id, { ...INPUT, owner: alive });
      const ids = [deadIds[0]!, liveIds[0]!, deadIds[1]!, deadIds[2]!, liveIds[1]!, deadIds[3]!];
      const results = await store.claimMany!(ids, { ...INPUT, owner: newSession(), takeoverFrom: dead });
      expect(results.map((r) => (r.status === 'acquired' ? `acquired ${r.takeover}` : r.status))).toEqual([
        'acquired true',
        'in_progress',
        'acquired true',
        'acquired true',
        'in_progress',
        'acquired true',
      ]);

      const contested = newId();
      await store.claim(contested, { ...INPUT, owner: dead });
      const rivals = await Promise.all(Array.from({ length: 4 }, another));
      const answers: ClaimResult[] = await Promise.all(
        Array.from({ length: 40 }, (_, i) => rivals[i % rivals.length]!.claim(contested, { ...INPUT, owner: newSession(), takeoverFrom: dead })),
      );
      expect(answers.filter((a) => a.status === 'acquired')).toHaveLength(1);
      expect(answers.filter((a) => a.status === 'in_progress')).toHaveLength(39);
    });

    it('takes over a record of a SIGKILLed process within 2 s (30 s lease, default sessions)', async () => {
      const engine = new Engine({ store: await another() });
      try {
        for (let round = 0; round < 3; round++) {
          const id = newId();
          const { child, session } = await holder(kind, prefix, id, 'hold');
          // While the process lives, its claim is in flight, and its session alive.
          expect((await engine.begin({ id, fingerprint: FP })).kind).toBe('in_flight');
          expect(await store.sessions.alive(session)).toBe(true);
          expect(await admin.hget(store.keyOf(id), 'w')).toBe(session);
          // The first round kills right after the process's first heartbeat (the worst phase: its
          // session key has almost a whole TTL left); the others at a random point between beats.
          if (round > 0) await sleep(Math.random() * 400);
          const killedAt = performance.now();
          await kill9(child);
          const { claim, ms, tries } = await retryUntilRun(engine, id, killedAt, 10_000);
          takeovers.push({ kind: name, ms });
          expect(ms, `takeover ${Math.round(ms)} ms after the kill (${tries} tries)`).toBeLessThan(2_000);
          expect(claim.takeover).toBe(true);
          expect(await admin.hget(store.keyOf(id), 'w')).toBe(engine.session!.id);
          expect(await claim.complete('taken over')).toBe(true);
        }
      } finally {
        await engine.close();
      }
    }, 180_000);

    it('takes over at once the claim of a session that ended (engine.close), and only with the same fingerprint', async () => {
      const owner = new Engine({ store: await another() });
      const heir = new Engine({ store: await another() });
      try {
        const id = newId();
        const begun = await owner.begin({ id, fingerprint: FP });
        if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
        expect((await heir.begin({ id, fingerprint: FP })).kind).toBe('in_flight');
        await owner.close();
        expect(await store.sessions.alive(owner.session!.id)).toBe(false);
        expect((await heir.begin({ id, fingerprint: 'v1:another body' })).kind).toBe('mismatch');
        const started = performance.now();
        const taken = await heir.begin({ id, fingerprint: FP });
        const ms = performance.now() - started;
        if (taken.kind !== 'run') throw new Error(`expected run, got ${taken.kind}`);
        expect(taken.claim.takeover).toBe(true);
        expect(ms).toBeLessThan(1_000);
        // The old owner's settlement is fenced.
        expect(await begun.claim.settle({ kind: 'complete', outcome: 'late' })).toBe('fenced');
        expect(await taken.claim.complete('by the heir')).toBe(true);
      } finally {
        await heir.close();
      }
    });

    it("does not take over a live owner's slow claim: its heartbeats keep the session alive past many TTLs", async () => {
      const owner = new Engine({ store: await another() });
      const other = new Engine({ store: await another() });
      try {
        const id = newId();
        const begun = await owner.begin({ id, fingerprint: FP });
        if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
        const kinds = new Set<string>();
        let tries = 0;
        const until = Date.now() + 3_500; // three and a half session TTLs
        while (Date.now() < until) {
          kinds.add((await other.begin({ id, fingerprint: FP })).kind);
          tries++;
          await sleep(100);
        }
        expect([...kinds]).toEqual(['in_flight']);
        expect(tries).toBeGreaterThan(5);
        expect(begun.claim.lost).toBe(false);
        expect(await begun.claim.settle({ kind: 'complete', outcome: 'slow but done' })).toBe('stored');
        const replay = await other.begin({ id, fingerprint: FP });
        expect(replay.kind === 'replay' && replay.record.outcome).toBe('slow but done');
      } finally {
        await owner.close();
        await other.close();
      }
    }, 60_000);

    it('takes over the claim of a process whose event loop stalls past its session TTL; its completion is fenced', async () => {
      const engine = new Engine({ store: await another() });
      try {
        const id = newId();
        const stalled = await holder(kind, prefix, id, 'stall', 3_000);
        await stalled.line(/stalling/);
        const since = performance.now();
        const { claim, ms } = await retryUntilRun(engine, id, since, 2_900);
        expect(ms).toBeLessThan(2_900);
        expect(claim.takeover).toBe(true);
        expect(await claim.complete('from the heir')).toBe(true);
        const settled = await stalled.line(/settled \S+ lost \S+/);
        expect(settled).toBe('settled fenced lost true');
        const record = await store.get(id);
        expect(record?.state === 'completed' && record.outcome).toBe('from the heir');
      } finally {
        await engine.close();
      }
    }, 120_000);

    if (name === 'ioredis') {
      it('costs the owner field per claim in progress, nothing on a completed record (MEMORY USAGE)', async () => {
        const usage = async (key: string): Promise<number> => Number(await admin.call('MEMORY', 'USAGE', key, 'SAMPLES', '0'));
        const withOwner = newId();
        const without = newId();
        const a = await store.claim(withOwner, { ...INPUT, owner: newSession() });
        const b = await store.claim(without, INPUT);
        const inProgress = [await usage(store.keyOf(without)), await usage(store.keyOf(withOwner))];
        if (a.status !== 'acquired' || b.status !== 'acquired') throw new Error('expected acquired');
        const outcome = 'o'.repeat(100);
        await store.complete(withOwner, a.token, outcome, 60_000);
        await store.complete(without, b.token, outcome, 60_000);
        const completed = [await usage(store.keyOf(without)), await usage(store.keyOf(withOwner))];
        const session = newSession();
        await store.sessions.heartbeat(session, 1_000);
        const sessionKey = await usage(store.sessionKeyOf(session));
        console.log(
          `MEMORY USAGE: in progress ${inProgress[0]} bytes without an owner, ${inProgress[1]} with one; ` +
            `completed (100-byte outcome) ${completed[0]} / ${completed[1]}; session key ${sessionKey}`,
        );
        expect(inProgress[1]! - inProgress[0]!).toBeGreaterThan(0);
        expect(inProgress[1]! - inProgress[0]!).toBeLessThanOrEqual(64);
        expect(completed[1]).toBe(completed[0]);
        expect(sessionKey).toBeLessThanOrEqual(160);
      });
    }
  });
}
