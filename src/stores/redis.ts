/**
 * Redis store: records live in Redis (standalone or Cluster), through the
 * client you already have: ioredis (`Redis`, `Cluster`) or node-redis v4/v5
 * (`createClient`, `createCluster`). Neither package is a dependency; the
 * client is recognised by its shape.
 *
 * Every operation is one Lua script (EVALSHA, falling back to EVAL once per
 * server when the script cache is empty), so each is atomic and costs at
 * most one round trip: writes asked for in the same turn of the event loop
 * share one script call. Lease deadlines come from the Redis server's `TIME`; records
 * expire by native TTL. See `docs/stores/redis.md` for the failure modes
 * (failover, eviction, persistence) and the client settings that make an
 * outage fail fast.
 *
 * @example
 * ```ts
 * import Redis from 'ioredis';
 * import { redisStore } from 'oncely/stores/redis';
 *
 * // Fail fast while Redis is down instead of queueing commands.
 * const client = new Redis({ enableOfflineQueue: false, maxRetriesPerRequest: 0 });
 * const store = redisStore({ client, prefix: 'payments' });
 * ```
 * @module
 */
import { createHash } from 'node:crypto';
import type {
  ClaimInput,
  ClaimResult,
  IdempotencyStore,
  StoreCapabilities,
  StoredRecord,
  StoreSessions,
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { ConfigError, StoreUnavailableError } from '../errors/index.js';
import { type ReplayCache, type ReplayCacheOptions, withReplayCache } from './replay-cache.js';

/**
 * The methods of an ioredis client (`Redis` or `Cluster`) this store calls.
 *
 * @example
 * ```ts
 * import Redis from 'ioredis';
 * const client: IoredisLike = new Redis({ enableOfflineQueue: false });
 * ```
 */
export interface IoredisLike {
  evalsha(sha: string, numKeys: number, ...keysAndArgs: string[]): Promise<unknown>;
  eval(script: string, numKeys: number, ...keysAndArgs: string[]): Promise<unknown>;
  /** `true` on an ioredis `Cluster`. */
  readonly isCluster?: boolean;
}

/**
 * Keys and arguments of a node-redis script call.
 *
 * @example
 * ```ts
 * const call: NodeRedisScriptOptions = { keys: ['oncely:{abc}'], arguments: ['token'] };
 * ```
 */
export interface NodeRedisScriptOptions {
  keys: string[];
  arguments: string[];
}

/**
 * The methods of a node-redis v4/v5 client (`createClient` or `createCluster`) this store calls.
 *
 * @example
 * ```ts
 * import { createClient } from 'redis';
 * const client: NodeRedisLike = await createClient({ disableOfflineQueue: true }).connect();
 * ```
 */
export interface NodeRedisLike {
  evalSha(sha: string, options: NodeRedisScriptOptions): Promise<unknown>;
  eval(script: string, options: NodeRedisScriptOptions): Promise<unknown>;
}

/**
 * Any client {@link redisStore} accepts: ioredis or node-redis, standalone or Cluster.
 *
 * @example
 * ```ts
 * import { createCluster } from 'redis';
 * const client: RedisClientLike = await createCluster({ rootNodes: [{ url: 'redis://10.0.0.1:6379' }] }).connect();
 * ```
 */
export type RedisClientLike = IoredisLike | NodeRedisLike;

/**
 * Options of {@link redisStore}.
 *
 * @example
 * ```ts
 * const options: RedisStoreOptions = { client, prefix: 'payments' };
 * ```
 */
export interface RedisStoreOptions {
  /** Your connected ioredis or node-redis client. The store never closes it. */
  client: RedisClientLike;
  /**
   * Start of every key, so that several services or environments can share
   * one Redis. Must not contain `{` or `}`. Default `"oncely"`.
   */
  prefix?: string;
  /**
   * Whether `client` talks to a Redis Cluster. Detected (ioredis `isCluster`,
   * node-redis cluster methods); set it only for a wrapped client. On a
   * cluster every operation is its own script (the client pipelines them),
   * because one script cannot touch keys in different slots.
   */
  cluster?: boolean;
  /**
   * Send the writes (claim, renew, complete, release) that are asked for in
   * the same turn of the event loop as one script, in the order they were
   * asked: one round trip instead of one each. Under load this is most of
   * the store's cost saved; a lone request waits for nothing (the batch goes
   * out at the end of the current turn, `setImmediate`). Ignored on a
   * cluster. Default `true`.
   */
  coalesce?: boolean;
  /**
   * Keep completed records this process has replayed, and answer the next
   * copies of those requests without a round trip: the store is wrapped in
   * {@link withReplayCache} (only replays are cached, bounded in entries,
   * bytes and age; see {@link ReplayCache}). `false` asks Redis every time.
   * Default `{}`: 10,000 records, 16 MiB, 60 s.
   */
  replayCache?: ReplayCacheOptions | false;
  /**
   * Count a claim, a completion or a renewal only once `replicas` replicas
   * have it (Redis `WAIT`), so that a failover cannot lose it. Off by
   * default: Redis replication is asynchronous, and a primary that dies
   * right after confirming a write loses it. See {@link RedisReplicationOptions}
   * and the Failover section of `docs/stores/redis.md`.
   */
  replication?: RedisReplicationOptions;
}

/**
 * The replication guarantee of {@link redisStore}: after the writes of one
 * turn of the event loop, the store sends one `WAIT replicas timeoutMs` per
 * Redis node, on the same connection and right behind them (one `WAIT`
 * covers every write made before it on its connection). When fewer replicas
 * acknowledge in time:
 *
 * - a claim that acquired the record is released (fenced by its own token)
 *   and rejects with `StoreUnavailableError`: nothing runs (HTTP 503);
 * - a completion or a renewal that changed the record rejects with
 *   `StoreUnavailableError`: the engine retries a completion with the same
 *   token until the lease deadline (a completion that did land answers true
 *   again), and counts a lease only as far as the last acknowledged renewal;
 * - everything else (a replay, an in-progress answer, a release) is answered as usual.
 *
 * `WAIT` blocks its connection (ioredis and node-redis send everything for
 * one node over one connection), so keep `timeoutMs` small, and well below
 * the engine's `storeTimeoutMs`.
 *
 * @example
 * ```ts
 * const store = redisStore({ client: cluster, replication: { replicas: 1, timeoutMs: 200 } });
 * ```
 */
export interface RedisReplicationOptions {
  /** Replicas that must have a write before it counts: a positive integer. */
  replicas: number;
  /** How long a `WAIT` may block, in ms: positive (Redis reads 0 as forever). */
  timeoutMs: number;
}

/**
 * The store {@link redisStore} returns: an {@link IdempotencyStore} that also
 * says where its records are.
 *
 * @example
 * ```ts
 * const store = redisStore({ client });
 * console.log(store.keyOf(recordId)); // "oncely:{<record id>}"
 * ```
 */
export interface RedisStore extends IdempotencyStore {
  /** The key prefix in use. */
  readonly prefix: string;
  /** Whether the store treats its client as a Redis Cluster client. */
  readonly cluster: boolean;
  /** The Redis key of the hash holding record `id`: `<prefix>:{<id>}`. */
  keyOf(id: string): string;
  /** The Redis key of process session `session` (a string with a TTL): `<prefix>:session:{<session>}`. */
  sessionKeyOf(session: string): string;
  /** Process sessions: a key per process with a short TTL (see the Sessions section of `docs/stores/redis.md`). */
  readonly sessions: StoreSessions;
}

const CAPABILITIES: StoreCapabilities = { nativeTtl: true, serverClock: true, shared: true };

// Arguments per operation in a batch: its letter and up to six arguments.
const STRIDE = 7;
// Operations sent in one script at most; a longer queue goes in several.
const MAX_BATCH = 256;

// Record layout: one hash per record, key `<prefix>:{<id>}` (the braces make
// the id the hash tag, so a record never spans slots).
//   s  state: 'p' in progress, 'c' completed
//   t  fencing token; on a completed record, the token that completed it
//   f  fingerprint: '-' for null, '=' + value otherwise (null never equals a string)
//   l  lease deadline, epoch ms on the server clock (in progress only)
//   k  '1' when the current owner took over an expired lease (in progress only)
//   e  expiry, epoch ms; the key's PEXPIREAT is always exactly this
//   o  outcome (completed only)
//   w  owner: the claiming process's session id (in progress only, when it has one)
//
// A process session is a string key `<prefix>:session:{<session id>}` with a
// short TTL that the process's heartbeat keeps setting: the session is alive
// while the key exists. It is in a slot of its own, so a claim script cannot
// read it: the engine asks alive() first and then claims with takeoverFrom.

// Shared Lua: the server clock, and integers written without float formatting.
const PRELUDE = `
if redis.replicate_commands then redis.replicate_commands() end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(n) return string.format('%d', n) end
`;

// One function per write operation; every one takes the batch's clock
// reading `now` (all operations in one script run at the same instant).
//
// claim answers
//   {'a', leaseUntil, takeover}  acquired (with the token passed for it)
//   {'c', fingerprint, expiresAt, outcome}
//   {'p', fingerprint, leaseUntil, now, owner}  owner '' when none is stored
// `owner` is the claiming process's session ('' for none), stored as 'w'.
// `from` ('' for none) is a dead session the engine found: a record in
// progress under exactly that owner is taken over whatever its lease, under
// the same fingerprint rule as an expired lease. An owner that changed
// meanwhile (someone else took over first) does not match.
// renew, complete and release answer 1 when they changed the record, else 0.
const OPERATIONS = `
local function claim(key, token, fp, lease, keep, now, owner, from)
  local r = redis.call('HMGET', key, 's', 't', 'f', 'l', 'e', 'o', 'k', 'w')
  if not r[1] then
    if owner == '' then
      redis.call('HSET', key, 's', 'p', 't', token, 'f', fp, 'l', int(now + lease), 'e', int(now + keep), 'k', '0')
    else
      redis.call('HSET', key, 's', 'p', 't', token, 'f', fp, 'l', int(now + lease), 'e', int(now + keep), 'k', '0', 'w', owner)
    end
    redis.call('PEXPIREAT', key, int(now + keep))
    return {'a', now + lease, 0}
  elseif r[1] == 'c' then
    return {'c', r[3] or '-', tonumber(r[5]) or 0, r[6] or ''}
  end
  local l = tonumber(r[4]) or 0
  if r[2] == token then
    -- This very claim already ran (the client resent it after a lost reply).
    return {'a', l, tonumber(r[7]) or 0}
  elseif r[3] == fp and (l <= now or (from ~= '' and r[8] == from)) then
    local e = math.max(tonumber(r[5]) or 0, now + keep)
    if owner == '' then
      redis.call('HSET', key, 't', token, 'l', int(now + lease), 'e', int(e), 'k', '1')
      -- The dead owner must not stay named: a takeoverFrom it would take this claim.
      if r[8] then redis.call('HDEL', key, 'w') end
    else
      redis.call('HSET', key, 't', token, 'l', int(now + lease), 'e', int(e), 'k', '1', 'w', owner)
    end
    redis.call('PEXPIREAT', key, int(e))
    return {'a', now + lease, 1}
  end
  return {'p', r[3] or '-', l, now, r[8] or ''}
end

local function renew(key, token, lease, now)
  local r = redis.call('HMGET', key, 's', 't', 'e')
  if r[1] ~= 'p' or r[2] ~= token then return 0 end
  local l = now + lease
  local e = math.max(tonumber(r[3]) or 0, l)
  redis.call('HSET', key, 'l', int(l), 'e', int(e))
  redis.call('PEXPIREAT', key, int(e))
  return 1
end

-- No lease check: the owner may still complete after its deadline until
-- someone takes over. The completed record keeps the token that completed
-- it, so the same complete sent again (a lost reply, a client resending it
-- after a failover, the engine retrying one whose replicas did not answer)
-- answers 1 without writing; another outcome under that token answers 0.
local function complete(key, token, outcome, ttl, now)
  local r = redis.call('HMGET', key, 's', 't', 'o')
  if r[1] == 'c' and r[2] == token and r[3] == outcome then return 1 end
  if r[1] ~= 'p' or r[2] ~= token then return 0 end
  local e = now + ttl
  redis.call('HSET', key, 's', 'c', 'o', outcome, 'e', int(e))
  redis.call('HDEL', key, 'l', 'k', 'w')
  redis.call('PEXPIREAT', key, int(e))
  return 1
end

local function release(key, token)
  local r = redis.call('HMGET', key, 's', 't')
  if r[1] ~= 'p' or r[2] ~= token then return 0 end
  redis.call('DEL', key)
  return 1
end

-- A session key: alive for ttl ms from now on the server clock (SET PX,
-- which replicas receive as an absolute PXAT). The value means nothing.
local function heartbeat(key, ttl)
  redis.call('SET', key, '1', 'PX', ttl)
  return 1
end

local function finish(key)
  return redis.call('DEL', key)
end
`;

// The one script behind claim, claimMany, renew, complete and release: a
// batch of operations, one key each, run in order. KEYS: one per operation;
// ARGV: ${STRIDE} per operation, the operation's letter then its arguments
// (padded with empty strings):
//   c token fingerprint leaseMs ttlMs owner from   claim
//   n token leaseMs                                renew
//   m token outcome ttlMs                          complete
//   x token                                        release
//   h ttlMs                                        session heartbeat (KEY: the session key)
//   q                                              session end (KEY: the session key)
// Answers one entry per operation, in order. Each operation runs under
// pcall: one that fails (a key of the wrong type, say) answers {'!', error}
// in its own slot, and the others run and answer as usual, so one request's
// bad key never fails the requests that happen to share its batch. Every
// operation reads before it writes, so one failing on its first command
// (WRONGTYPE) has changed nothing.
const BATCH = `${PRELUDE}${OPERATIONS}
local function failed(e)
  if type(e) == 'table' and e.err then return {'!', e.err} end
  return {'!', tostring(e)}
end
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local b = (i - 1) * ${STRIDE}
  local op = ARGV[b + 1]
  local ok, r
  if op == 'c' then
    local lease = tonumber(ARGV[b + 4])
    ok, r = pcall(claim, key, ARGV[b + 2], ARGV[b + 3], lease, math.max(tonumber(ARGV[b + 5]), lease), now, ARGV[b + 6], ARGV[b + 7])
  elseif op == 'n' then
    ok, r = pcall(renew, key, ARGV[b + 2], tonumber(ARGV[b + 3]), now)
  elseif op == 'm' then
    ok, r = pcall(complete, key, ARGV[b + 2], ARGV[b + 3], tonumber(ARGV[b + 4]), now)
  elseif op == 'x' then
    ok, r = pcall(release, key, ARGV[b + 2])
  elseif op == 'h' then
    ok, r = pcall(heartbeat, key, tonumber(ARGV[b + 2]))
  elseif op == 'q' then
    ok, r = pcall(finish, key)
  else
    return redis.error_reply('oncely: unknown operation ' .. tostring(op))
  end
  if ok then out[i] = r else out[i] = failed(r) end
end
return out
`;

// KEYS[1]. {state, fingerprint, leaseUntil, expiresAt, outcome}, state false when absent.
const GET = `return redis.call('HMGET', KEYS[1], 's', 'f', 'l', 'e', 'o')`;

// KEYS[1]. 1 when a record existed.
const DELETE = `return redis.call('DEL', KEYS[1])`;

// KEYS[1], a session key. 1 while the session is alive (an expired key is absent to EXISTS).
const ALIVE = `return redis.call('EXISTS', KEYS[1])`;

interface Script {
  readonly source: string;
  readonly sha: string;
}

const script = (source: string): Script => ({ source, sha: createHash('sha1').update(source).digest('hex') });

const SCRIPTS = {
  batch: script(BATCH),
  get: script(GET),
  delete: script(DELETE),
  alive: script(ALIVE),
} as const;

type Runner = (s: Script, keys: string[], args: string[]) => Promise<unknown>;

// One write operation waiting for its batch: its key, its STRIDE arguments
// (its letter in BATCH, then its own, padded), and who to answer.
interface Operation {
  key: string;
  args: string[];
  resolve(reply: unknown): void;
  reject(error: unknown): void;
}

const errorMessage = (error: unknown): string =>
  typeof error === 'object' && error !== null ? String((error as { message?: unknown }).message) : String(error);

// The server lacks the script. Not only a message starting with NOSCRIPT:
// after a Cluster failover ioredis answers "Too many Cluster redirections.
// Last error: ReplyError: NOSCRIPT …", and some errors carry the reply as
// `lastNodeError` (ioredis ClusterAllFailedError) or `cause`. Missing one
// means no EVAL fallback, so every call fails until something reloads the
// script. Each of these says the script did not run, so EVAL is safe.
function isNoScript(error: unknown, depth = 0): boolean {
  if (/\bNOSCRIPT\b/.test(errorMessage(error))) return true;
  if (depth >= 3 || typeof error !== 'object' || error === null) return false;
  const { lastNodeError, cause } = error as { lastNodeError?: unknown; cause?: unknown };
  return (
    (lastNodeError !== undefined && isNoScript(lastNodeError, depth + 1)) ||
    (cause !== undefined && isNoScript(cause, depth + 1))
  );
}

// EVALSHA first: the steady state sends only the 40-byte sha. A server that
// lost its script cache (restart, failover, SCRIPT FLUSH) answers NOSCRIPT
// once; EVAL then runs the script and caches it again.
function makeRunner(client: RedisClientLike): Runner {
  const node = client as Partial<NodeRedisLike>;
  if (typeof node.evalSha === 'function' && typeof node.eval === 'function') {
    const c = client as NodeRedisLike;
    return async (s, keys, args) => {
      try {
        return await c.evalSha(s.sha, { keys, arguments: args });
      } catch (error) {
        if (!isNoScript(error)) throw error;
        return c.eval(s.source, { keys, arguments: args });
      }
    };
  }
  const io = client as Partial<IoredisLike>;
  if (typeof io.evalsha === 'function' && typeof io.eval === 'function') {
    const c = client as IoredisLike;
    return async (s, keys, args) => {
      try {
        return await c.evalsha(s.sha, keys.length, ...keys, ...args);
      } catch (error) {
        if (!isNoScript(error)) throw error;
        return c.eval(s.source, keys.length, ...keys, ...args);
      }
    };
  }
  throw new ConfigError(
    'redisStore: `client` is neither an ioredis client (evalsha/eval) nor a node-redis client (evalSha/eval).',
  );
}

function detectCluster(client: RedisClientLike): boolean {
  const c = client as { isCluster?: unknown; getSlotMaster?: unknown; getMasters?: unknown };
  return c.isCluster === true || typeof c.getSlotMaster === 'function' || typeof c.getMasters === 'function';
}

// --- Replication (WAIT) -----------------------------------------------------
//
// WAIT counts the replicas that have every write made so far *on its own
// connection*, so it must follow the scripts on the very connection they went
// over, and the answers must be known to come from that connection. Each
// client gives that differently:
//   ioredis Redis and Cluster: a pipeline (a Cluster sends a whole pipeline to
//     one node, and when it re-sends one after a lost connection or a
//     redirection, it re-sends all of it, WAIT included);
//   node-redis: the node's own client (no redirections: a MOVED comes back as
//     an error), commands written in the order they were asked.

/** One script call of a replicated round: the operations of one BATCH. */
interface Call {
  keys: string[];
  args: string[];
}

type Answer = { ok: true; value: unknown } | { ok: false; error: unknown };

/** What one node answered: each call's reply, and how many replicas acknowledged (WAIT). */
interface Round {
  answers: Answer[];
  acked: number;
}

interface Replicator {
  /** The node (connection) serving `slot`, as a key to group operations by. */
  nodeOf(slot: number): unknown;
  /** Send `calls` to `node`, then (when `wait`) one WAIT, on one connection. */
  exchange(node: unknown, calls: Call[], useEval: boolean, wait: boolean): Promise<Round>;
  /** Ask the client to re-read the slot map (after a MOVED), when it can. */
  refresh(): void;
}

/** The pipeline of an ioredis client, as far as replication uses it. */
interface IoredisPipelineLike {
  evalsha(sha: string, numKeys: number, ...keysAndArgs: string[]): unknown;
  eval(script: string, numKeys: number, ...keysAndArgs: string[]): unknown;
  call(command: string, ...args: string[]): unknown;
  exec(): Promise<Array<[Error | null, unknown]> | null>;
}

interface IoredisReplicationLike {
  pipeline(): IoredisPipelineLike;
  /** Cluster: per slot, the node keys serving it, master first. */
  slots?: unknown;
  refreshSlotsCache?(): unknown;
}

interface NodeRedisCommandsLike {
  sendCommand(args: string[]): Promise<unknown>;
}

interface NodeRedisClusterReplicationLike {
  getSlotMaster(slot: number): unknown;
  nodeClient(node: unknown): unknown;
}

const CRC16 = (() => {
  const table = new Uint16Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i << 8;
    for (let j = 0; j < 8; j++) c = c & 0x8000 ? ((c << 1) ^ 0x1021) & 0xffff : (c << 1) & 0xffff;
    table[i] = c;
  }
  return table;
})();
const encoder = new TextEncoder();

/** The Redis Cluster slot of `key`: CRC16 of its hash tag (or of the key), mod 16384. */
function keySlot(key: string): number {
  let tag = key;
  const open = key.indexOf('{');
  if (open >= 0) {
    const close = key.indexOf('}', open + 1);
    if (close > open + 1) tag = key.slice(open + 1, close);
  }
  let crc = 0;
  for (const byte of encoder.encode(tag)) crc = ((crc << 8) & 0xffff) ^ CRC16[((crc >> 8) ^ byte) & 0xff]!;
  return crc & 16383;
}

const settle = (promise: Promise<unknown>): Promise<Answer> =>
  promise.then(
    (value): Answer => ({ ok: true, value }),
    (error: unknown): Answer => ({ ok: false, error }),
  );

// Raw commands on one node-redis connection, written in the order asked.
async function sendRaw(client: NodeRedisCommandsLike, s: Script, calls: Call[], useEval: boolean, wait: string[] | undefined): Promise<Round> {
  const replies = calls.map((c) =>
    settle(client.sendCommand([useEval ? 'EVAL' : 'EVALSHA', useEval ? s.source : s.sha, String(c.keys.length), ...c.keys, ...c.args])),
  );
  const waited = wait ? settle(client.sendCommand(wait)) : undefined;
  const answers = await Promise.all(replies);
  const w = waited ? await waited : undefined;
  return { answers, acked: w === undefined ? Number.POSITIVE_INFINITY : w.ok ? int(w.value) : 0 };
}

function makeReplicator(client: RedisClientLike, cluster: () => boolean, replication: RedisReplicationOptions): Replicator {
  const s = SCRIPTS.batch;
  const wait = ['WAIT', String(replication.replicas), String(Math.ceil(replication.timeoutMs))];
  const io = client as Partial<IoredisReplicationLike> & Partial<IoredisLike>;
  if (typeof io.evalsha === 'function') {
    if (typeof io.pipeline !== 'function') {
      throw new ConfigError('redisStore: `replication` needs an ioredis client with pipeline().');
    }
    const c = client as unknown as IoredisReplicationLike;
    return {
      nodeOf(slot) {
        if (!cluster()) return '';
        // The same grouping ioredis makes: a pipeline may only hold keys of slots served by the same nodes.
        const nodes = Array.isArray(c.slots) ? (c.slots[slot] as unknown) : undefined;
        return Array.isArray(nodes) && nodes.length > 0 ? nodes.join(';') : `slot ${slot}`;
      },
      async exchange(_node, calls, useEval, withWait) {
        const pipeline = c.pipeline();
        for (const call of calls) {
          if (useEval) pipeline.eval(s.source, call.keys.length, ...call.keys, ...call.args);
          else pipeline.evalsha(s.sha, call.keys.length, ...call.keys, ...call.args);
        }
        if (withWait) pipeline.call(wait[0]!, ...wait.slice(1));
        const replies = (await pipeline.exec()) ?? [];
        const answers = calls.map((_, i): Answer => {
          const [error, value] = replies[i] ?? [new Error('redis store: no reply in pipeline'), undefined];
          return error ? { ok: false, error } : { ok: true, value };
        });
        const w = replies[calls.length];
        return { answers, acked: !withWait ? Number.POSITIVE_INFINITY : w && !w[0] ? int(w[1]) : 0 };
      },
      refresh() {
        try {
          (c.refreshSlotsCache as ((callback?: () => void) => unknown) | undefined)?.call(c, () => {});
        } catch {
          // Best effort: ioredis also refreshes on its own schedule.
        }
      },
    };
  }
  if (!cluster()) {
    const c = client as Partial<NodeRedisCommandsLike>;
    if (typeof c.sendCommand !== 'function') {
      throw new ConfigError('redisStore: `replication` needs a node-redis client with sendCommand().');
    }
    const commands = client as unknown as NodeRedisCommandsLike;
    return {
      nodeOf: () => '',
      exchange: (_node, calls, useEval, withWait) => sendRaw(commands, s, calls, useEval, withWait ? wait : undefined),
      refresh() {},
    };
  }
  const c = client as unknown as Partial<NodeRedisClusterReplicationLike>;
  if (typeof c.getSlotMaster !== 'function' || typeof c.nodeClient !== 'function') {
    throw new ConfigError('redisStore: `replication` needs a node-redis cluster with getSlotMaster() and nodeClient().');
  }
  const nodes = client as unknown as NodeRedisClusterReplicationLike;
  return {
    nodeOf(slot) {
      try {
        return nodes.getSlotMaster(slot) ?? `slot ${slot}`;
      } catch {
        return `slot ${slot}`;
      }
    },
    async exchange(node, calls, useEval, withWait) {
      if (typeof node !== 'object' || node === null) throw new Error(`redis store: no master known for ${String(node)}`);
      // The node's own connection, which the cluster also routes this slot's commands over.
      const commands = (await nodes.nodeClient(node)) as NodeRedisCommandsLike;
      return sendRaw(commands, s, calls, useEval, withWait ? wait : undefined);
    },
    refresh() {},
  };
}

function checkReplication(replication: RedisReplicationOptions | undefined): RedisReplicationOptions | undefined {
  if (replication === undefined) return undefined;
  if (replication === null || typeof replication !== 'object') {
    throw new ConfigError('redisStore: `replication` must be { replicas, timeoutMs }.');
  }
  const { replicas, timeoutMs } = replication;
  if (!Number.isInteger(replicas) || replicas < 1) {
    throw new ConfigError(`redisStore: replication.replicas must be a positive integer, got ${String(replicas)}`);
  }
  if (typeof timeoutMs !== 'number' || !Number.isFinite(timeoutMs) || timeoutMs <= 0) {
    throw new ConfigError(`redisStore: replication.timeoutMs must be a positive number of ms, got ${String(timeoutMs)}`);
  }
  return { replicas, timeoutMs };
}

const decoder = new TextDecoder();

// Replies are strings by default; a node-redis client with a Buffer type
// mapping gives bytes, and integers arrive as numbers.
function text(value: unknown): string {
  if (typeof value === 'string') return value;
  if (value instanceof Uint8Array) return decoder.decode(value);
  if (value === null || value === undefined) return '';
  return String(value);
}

function int(value: unknown): number {
  return typeof value === 'number' ? value : Number(text(value));
}

function list(value: unknown): unknown[] {
  if (!Array.isArray(value)) throw new Error(`redis store: unexpected script reply ${String(value)}`);
  return value;
}

// The answer of an operation that failed inside BATCH: {'!', Redis's error message}.
const isFailure = (reply: unknown): reply is [unknown, unknown] => Array.isArray(reply) && text(reply[0]) === '!';

const encodeFingerprint = (fingerprint: string | null): string => (fingerprint === null ? '-' : `=${fingerprint}`);

function decodeFingerprint(value: unknown): string | null {
  const s = text(value);
  return s.startsWith('=') ? s.slice(1) : null;
}

function ms(name: string, value: number): string {
  if (!Number.isFinite(value) || value <= 0) throw new ConfigError(`redisStore: ${name} must be a positive number of ms, got ${value}`);
  return String(Math.ceil(value));
}

// Every operation takes STRIDE arguments in BATCH: its own, then empty strings.
function padded(args: string[]): string[] {
  while (args.length < STRIDE) args.push('');
  return args;
}

// A claim's arguments after its token: fingerprint, leaseMs, ttlMs, owner, takeoverFrom.
function claimArgs(input: ClaimInput): string[] {
  return [
    encodeFingerprint(input.fingerprint),
    ms('leaseMs', input.leaseMs),
    ms('ttlMs', input.ttlMs),
    input.owner ?? '',
    input.takeoverFrom ?? '',
  ];
}

function decodeClaim(raw: unknown, token: string): ClaimResult {
  const r = list(raw);
  switch (text(r[0])) {
    case 'a':
      return { status: 'acquired', token, takeover: int(r[2]) === 1, leaseUntil: int(r[1]) };
    case 'c':
      return {
        status: 'completed',
        record: { state: 'completed', fingerprint: decodeFingerprint(r[1]), outcome: text(r[3]), expiresAt: int(r[2]) },
      };
    case 'p': {
      const owner = text(r[4]);
      return {
        status: 'in_progress',
        fingerprint: decodeFingerprint(r[1]),
        leaseUntil: int(r[2]),
        now: int(r[3]),
        ...(owner === '' ? {} : { owner }),
      };
    }
    default:
      throw new Error(`redis store: unexpected claim reply ${JSON.stringify(r)}`);
  }
}

/**
 * Create a Redis store on your ioredis or node-redis client (standalone or
 * Cluster). Each operation is one Lua script call; leases use the Redis
 * server's clock; records expire by native TTL (`purgeExpired` does nothing).
 *
 * Configure the client to fail fast while Redis is unreachable (ioredis
 * `enableOfflineQueue: false` and `maxRetriesPerRequest: 0`, node-redis
 * `disableOfflineQueue: true`); otherwise commands queue until the engine's
 * store timeout. The store never closes the client.
 *
 * @example
 * ```ts
 * // ioredis
 * import Redis, { Cluster } from 'ioredis';
 * const store = redisStore({ client: new Redis({ enableOfflineQueue: false, maxRetriesPerRequest: 0 }) });
 * const clustered = redisStore({
 *   client: new Cluster([{ host: '10.0.0.1', port: 6379 }], { enableOfflineQueue: false }),
 * });
 *
 * // node-redis
 * import { createClient } from 'redis';
 * const client = createClient({ url: 'redis://127.0.0.1:6379', disableOfflineQueue: true });
 * client.on('error', (e) => log.warn(e)); // node-redis throws on an unhandled 'error' event
 * await client.connect();
 * const store2 = redisStore({ client, prefix: 'orders' });
 * ```
 * @throws {@link ConfigError} when `client` is not a recognised client or `prefix` contains a brace.
 */
export function redisStore(options: RedisStoreOptions): RedisStore {
  const { client, prefix = 'oncely' } = options;
  if (client === null || typeof client !== 'object') throw new ConfigError('redisStore: `client` is required.');
  if (/[{}]/.test(prefix)) {
    throw new ConfigError(`redisStore: prefix ${JSON.stringify(prefix)} must not contain "{" or "}" (the id is the hash tag).`);
  }
  const run = makeRunner(client);
  let cluster = options.cluster ?? detectCluster(client);
  const coalesce = options.coalesce ?? true;
  const replication = checkReplication(options.replication);
  // A getter: a cluster client found out late (CROSSSLOT) is grouped by node from then on.
  const replicator = replication ? makeReplicator(client, () => cluster, replication) : undefined;
  const keyOf = (id: string): string => `${prefix}:{${id}}`;
  const sessionKeyOf = (session: string): string => `${prefix}:session:{${session}}`;

  // Operations waiting for the end of this turn of the event loop. They go
  // out together as one BATCH script: one round trip, one write on each
  // side, however many requests asked in the meantime.
  const queue: Operation[] = [];
  let scheduled = false;

  const send = (ops: Operation[]): void => {
    run(
      SCRIPTS.batch,
      ops.map((op) => op.key),
      ops.flatMap((op) => op.args),
    ).then(
      (raw) => {
        let replies: unknown[];
        try {
          replies = list(raw);
          if (replies.length !== ops.length) throw new Error(`redis store: ${replies.length} replies for ${ops.length} operations`);
        } catch (error) {
          for (const op of ops) op.reject(error);
          return;
        }
        for (let i = 0; i < ops.length; i++) {
          const reply = replies[i];
          if (isFailure(reply)) ops[i]!.reject(new Error(text(reply[1])));
          else ops[i]!.resolve(reply);
        }
      },
      (error: unknown) => {
        // A cluster client that was not detected: the server refused the
        // multi-key batch before running it, so nothing changed; from now
        // on every operation goes alone.
        if (ops.length > 1 && errorMessage(error).startsWith('CROSSSLOT')) {
          cluster = true;
          for (const op of ops) send([op]);
          return;
        }
        for (const op of ops) op.reject(error);
      },
    );
  };

  const flush = (): void => {
    scheduled = false;
    while (queue.length > 0) send(queue.splice(0, MAX_BATCH));
  };

  // With replication: the writes of this turn, sent at its end as one round
  // per node: its scripts, then one WAIT behind them on the same connection.
  const pending: Operation[] = [];
  let pendingScheduled = false;

  const notAcknowledged = (what: string, acked: number): StoreUnavailableError =>
    new StoreUnavailableError(
      `Redis: ${acked} of ${replication!.replicas} replicas acknowledged the ${what} within ${replication!.timeoutMs} ms (WAIT).`,
    );

  // Answer one operation of a replicated round: as usual once its replicas
  // acknowledged; otherwise whatever it wrote does not count (a failover
  // could lose it): an acquired claim is released and refused, a completion
  // or renewal that changed the record is refused (the engine retries a
  // completion with the same token). Answers that wrote nothing stand.
  const answer = (op: Operation, reply: unknown, acked: number): void => {
    if (isFailure(reply)) {
      op.reject(new Error(text(reply[1])));
      return;
    }
    if (acked >= replication!.replicas) {
      op.resolve(reply);
      return;
    }
    const letter = op.args[0];
    if (letter === 'c' && Array.isArray(reply) && text(reply[0]) === 'a') {
      // Fenced by the claim's own token: it deletes nothing else. Without a
      // reply the record stays in progress until its lease ends.
      run(SCRIPTS.batch, [op.key], padded(['x', op.args[1]!])).catch(() => {});
      op.reject(notAcknowledged('claim; it was released and nothing was done', acked));
    } else if ((letter === 'm' || letter === 'n' || letter === 'h') && int(reply) === 1) {
      // A heartbeat a failover could lose would let others take over live claims: it does not count either.
      op.reject(notAcknowledged(letter === 'm' ? 'completion' : letter === 'n' ? 'renewal' : 'session heartbeat', acked));
    } else {
      op.resolve(reply);
    }
  };

  const commit = async (node: unknown, ops: Operation[]): Promise<void> => {
    const r = replicator!;
    // On a cluster one script per operation (a script cannot span slots);
    // otherwise as few scripts as MAX_BATCH allows.
    const groups: Operation[][] = [];
    if (cluster || !coalesce) for (const op of ops) groups.push([op]);
    else for (let i = 0; i < ops.length; i += MAX_BATCH) groups.push(ops.slice(i, i + MAX_BATCH));
    const callOf = (g: Operation[]): Call => ({ keys: g.map((op) => op.key), args: g.flatMap((op) => op.args) });
    // Releases and session ends alone need no WAIT: one that a failover loses leaves a lease (or a session TTL) to run out.
    const needsWait = (g: Operation[][]): boolean => g.some((group) => group.some((op) => op.args[0] !== 'x' && op.args[0] !== 'q'));
    const outcomes: Array<{ answer: Answer; acked: number }> = [];
    try {
      const round = await r.exchange(node, groups.map(callOf), false, needsWait(groups));
      for (const a of round.answers) outcomes.push({ answer: a, acked: round.acked });
      // A server without the script ran nothing of that call: EVAL it, with its own WAIT.
      const missing = groups.map((_, i) => i).filter((i) => !round.answers[i]!.ok && isNoScript((round.answers[i] as { error: unknown }).error));
      if (missing.length > 0) {
        const again = missing.map((i) => groups[i]!);
        const retry = await r.exchange(node, again.map(callOf), true, needsWait(again));
        missing.forEach((i, j) => {
          outcomes[i] = { answer: retry.answers[j]!, acked: retry.acked };
        });
      }
    } catch (error) {
      for (const op of ops) op.reject(error);
      return;
    }
    groups.forEach((group, i) => {
      const { answer: a, acked } = outcomes[i]!;
      if (!a.ok) {
        const message = errorMessage(a.error);
        // A cluster client that was not detected refused the multi-key script
        // before running it: from now on every operation goes alone.
        if (group.length > 1 && message.startsWith('CROSSSLOT')) {
          cluster = true;
          submit(group);
          return;
        }
        // Redirected: the script did not run there. The caller retries (a
        // claim gets a 503, the engine retries a completion) once the slot map is fresh.
        if (/^(MOVED|ASK) /.test(message)) r.refresh();
        for (const op of group) op.reject(a.error);
        return;
      }
      let replies: unknown[];
      try {
        replies = list(a.value);
        if (replies.length !== group.length) throw new Error(`redis store: ${replies.length} replies for ${group.length} operations`);
      } catch (error) {
        for (const op of group) op.reject(error);
        return;
      }
      for (let j = 0; j < group.length; j++) answer(group[j]!, replies[j], acked);
    });
  };

  // One round per node (per connection): grouped by the slot each key lives in.
  const flushPending = (): void => {
    pendingScheduled = false;
    const byNode = new Map<unknown, Operation[]>();
    for (const op of pending.splice(0)) {
      const node = cluster ? replicator!.nodeOf(keySlot(op.key)) : '';
      const ops = byNode.get(node);
      if (ops) ops.push(op);
      else byNode.set(node, [op]);
    }
    for (const [node, ops] of byNode) void commit(node, ops);
  };

  // Send `ops` (each waits on its own promise): on a cluster one by one,
  // since one script cannot span slots (the client still pipelines them);
  // otherwise as one script, joined by whatever else this turn asks for.
  const submit = (ops: Operation[]): void => {
    if (replicator) {
      for (const op of ops) pending.push(op);
      if (!pendingScheduled) {
        pendingScheduled = true;
        setImmediate(flushPending);
      }
      return;
    }
    if (cluster) {
      for (const op of ops) send([op]);
      return;
    }
    if (!coalesce) {
      send(ops);
      return;
    }
    for (const op of ops) queue.push(op);
    if (queue.length >= MAX_BATCH) flush();
    else if (!scheduled) {
      scheduled = true;
      setImmediate(flush);
    }
  };

  const operationOn = (key: string, args: string[]): [Operation, Promise<unknown>] => {
    let op!: Operation;
    const answer = new Promise<unknown>((resolve, reject) => {
      op = { key, args: padded(args), resolve, reject };
    });
    return [op, answer];
  };

  const operation = (id: string, ...args: string[]): [Operation, Promise<unknown>] => operationOn(keyOf(id), args);

  const one = (id: string, ...args: string[]): Promise<unknown> => {
    const [op, answer] = operation(id, ...args);
    submit([op]);
    return answer;
  };

  // A session's writes go through the same path as a record's (batched with
  // the turn's other writes on a standalone Redis, one script on a cluster,
  // WAITed for under `replication`); only the key differs.
  const onSession = (session: string, ...args: string[]): Promise<unknown> => {
    const [op, answer] = operationOn(sessionKeyOf(session), args);
    submit([op]);
    return answer;
  };

  const sessions: StoreSessions = {
    async heartbeat(session, ttlMs) {
      await onSession(session, 'h', ms('ttlMs', ttlMs));
    },
    async alive(session) {
      return int(await run(SCRIPTS.alive, [sessionKeyOf(session)], [])) === 1;
    },
    async end(session) {
      await onSession(session, 'q');
    },
  };

  const base: IdempotencyStore = {
    name: 'redis',
    capabilities: CAPABILITIES,
    async claim(id, input) {
      const token = newToken();
      const raw = await one(id, 'c', token, ...claimArgs(input));
      return decodeClaim(raw, token);
    },
    async claimMany(ids, input) {
      const args = claimArgs(input);
      // Submitted together and in order, so on a standalone Redis they share
      // one script and a repeated id meets its own earlier claim.
      const tokens = ids.map(() => newToken());
      const pairs = ids.map((id, i) => operation(id, 'c', tokens[i]!, ...args));
      submit(pairs.map(([op]) => op));
      const settled = await Promise.allSettled(pairs.map(([, answer]) => answer));
      const failure = settled.find((s) => s.status === 'rejected');
      if (failure !== undefined) {
        // All or nothing: the caller gets no tokens, so release every claim
        // of the batch (fenced by token: one that never took effect changes
        // nothing), or they would stay in progress under tokens nobody
        // holds. Best effort: the first error is the answer.
        await Promise.allSettled(ids.map((id, i) => one(id, 'x', tokens[i]!)));
        throw failure.reason;
      }
      return settled.map((s, i) => decodeClaim((s as PromiseFulfilledResult<unknown>).value, tokens[i]!));
    },
    async renew(id, token, leaseMs) {
      return int(await one(id, 'n', token, ms('leaseMs', leaseMs))) === 1;
    },
    async complete(id, token, outcome, ttlMs) {
      return int(await one(id, 'm', token, outcome, ms('ttlMs', ttlMs))) === 1;
    },
    async release(id, token) {
      return int(await one(id, 'x', token)) === 1;
    },
    async get(id): Promise<StoredRecord | null> {
      const [state, fingerprint, leaseUntil, expiresAt, outcome] = list(await run(SCRIPTS.get, [keyOf(id)], []));
      const s = text(state);
      if (s === 'c') {
        return { state: 'completed', fingerprint: decodeFingerprint(fingerprint), outcome: text(outcome), expiresAt: int(expiresAt) };
      }
      if (s === 'p') {
        return {
          state: 'in_progress',
          fingerprint: decodeFingerprint(fingerprint),
          leaseUntil: int(leaseUntil),
          expiresAt: int(expiresAt),
        };
      }
      return null;
    },
    async delete(id) {
      return int(await run(SCRIPTS.delete, [keyOf(id)], [])) > 0;
    },
    async purgeExpired() {
      return 0;
    },
    async close() {
      // The client belongs to the caller.
    },
    sessions,
  };

  // The same wrapper any store can put in front of itself: one mechanism.
  const store = options.replayCache === false ? base : withReplayCache(base, options.replayCache);
  return {
    ...store,
    prefix,
    get cluster() {
      return cluster;
    },
    keyOf,
    sessionKeyOf,
    sessions,
  };
}
