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
  ClaimResult,
  IdempotencyStore,
  StoreCapabilities,
  StoredRecord,
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { ConfigError } from '../errors/index.js';
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
}

const CAPABILITIES: StoreCapabilities = { nativeTtl: true, serverClock: true, shared: true };

// Arguments per operation in a batch: its letter and up to four arguments.
const STRIDE = 5;
// Operations sent in one script at most; a longer queue goes in several.
const MAX_BATCH = 256;

// Record layout: one hash per record, key `<prefix>:{<id>}` (the braces make
// the id the hash tag, so a record never spans slots).
//   s  state: 'p' in progress, 'c' completed
//   t  fencing token (in progress only)
//   f  fingerprint: '-' for null, '=' + value otherwise (null never equals a string)
//   l  lease deadline, epoch ms on the server clock (in progress only)
//   k  '1' when the current owner took over an expired lease (in progress only)
//   e  expiry, epoch ms; the key's PEXPIREAT is always exactly this
//   o  outcome (completed only)

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
//   {'p', fingerprint, leaseUntil, now}
// renew, complete and release answer 1 when they changed the record, else 0.
const OPERATIONS = `
local function claim(key, token, fp, lease, keep, now)
  local r = redis.call('HMGET', key, 's', 't', 'f', 'l', 'e', 'o', 'k')
  if not r[1] then
    redis.call('HSET', key, 's', 'p', 't', token, 'f', fp, 'l', int(now + lease), 'e', int(now + keep), 'k', '0')
    redis.call('PEXPIREAT', key, int(now + keep))
    return {'a', now + lease, 0}
  elseif r[1] == 'c' then
    return {'c', r[3] or '-', tonumber(r[5]) or 0, r[6] or ''}
  end
  local l = tonumber(r[4]) or 0
  if r[2] == token then
    -- This very claim already ran (the client resent it after a lost reply).
    return {'a', l, tonumber(r[7]) or 0}
  elseif l <= now and r[3] == fp then
    local e = math.max(tonumber(r[5]) or 0, now + keep)
    redis.call('HSET', key, 't', token, 'l', int(now + lease), 'e', int(e), 'k', '1')
    redis.call('PEXPIREAT', key, int(e))
    return {'a', now + lease, 1}
  end
  return {'p', r[3] or '-', l, now}
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
-- someone takes over.
local function complete(key, token, outcome, ttl, now)
  local r = redis.call('HMGET', key, 's', 't')
  if r[1] ~= 'p' or r[2] ~= token then return 0 end
  local e = now + ttl
  redis.call('HSET', key, 's', 'c', 'o', outcome, 'e', int(e))
  redis.call('HDEL', key, 't', 'l', 'k')
  redis.call('PEXPIREAT', key, int(e))
  return 1
end

local function release(key, token)
  local r = redis.call('HMGET', key, 's', 't')
  if r[1] ~= 'p' or r[2] ~= token then return 0 end
  redis.call('DEL', key)
  return 1
end
`;

// The one script behind claim, claimMany, renew, complete and release: a
// batch of operations, one key each, run in order. KEYS: one per operation;
// ARGV: ${STRIDE} per operation, the operation's letter then its arguments
// (padded with empty strings):
//   c token fingerprint leaseMs ttlMs   claim
//   n token leaseMs                     renew
//   m token outcome ttlMs               complete
//   x token                             release
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
    ok, r = pcall(claim, key, ARGV[b + 2], ARGV[b + 3], lease, math.max(tonumber(ARGV[b + 5]), lease), now)
  elseif op == 'n' then
    ok, r = pcall(renew, key, ARGV[b + 2], tonumber(ARGV[b + 3]), now)
  elseif op == 'm' then
    ok, r = pcall(complete, key, ARGV[b + 2], ARGV[b + 3], tonumber(ARGV[b + 4]), now)
  elseif op == 'x' then
    ok, r = pcall(release, key, ARGV[b + 2])
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

interface Script {
  readonly source: string;
  readonly sha: string;
}

const script = (source: string): Script => ({ source, sha: createHash('sha1').update(source).digest('hex') });

const SCRIPTS = {
  batch: script(BATCH),
  get: script(GET),
  delete: script(DELETE),
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
    case 'p':
      return { status: 'in_progress', fingerprint: decodeFingerprint(r[1]), leaseUntil: int(r[2]), now: int(r[3]) };
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
  const keyOf = (id: string): string => `${prefix}:{${id}}`;

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

  // Send `ops` (each waits on its own promise): on a cluster one by one,
  // since one script cannot span slots (the client still pipelines them);
  // otherwise as one script, joined by whatever else this turn asks for.
  const submit = (ops: Operation[]): void => {
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

  const operation = (id: string, ...args: string[]): [Operation, Promise<unknown>] => {
    while (args.length < STRIDE) args.push('');
    let op!: Operation;
    const answer = new Promise<unknown>((resolve, reject) => {
      op = { key: keyOf(id), args, resolve, reject };
    });
    return [op, answer];
  };

  const one = (id: string, ...args: string[]): Promise<unknown> => {
    const [op, answer] = operation(id, ...args);
    submit([op]);
    return answer;
  };

  const base: IdempotencyStore = {
    name: 'redis',
    capabilities: CAPABILITIES,
    async claim(id, input) {
      const token = newToken();
      const raw = await one(id, 'c', token, encodeFingerprint(input.fingerprint), ms('leaseMs', input.leaseMs), ms('ttlMs', input.ttlMs));
      return decodeClaim(raw, token);
    },
    async claimMany(ids, input) {
      const fingerprint = encodeFingerprint(input.fingerprint);
      const leaseMs = ms('leaseMs', input.leaseMs);
      const ttlMs = ms('ttlMs', input.ttlMs);
      // Submitted together and in order, so on a standalone Redis they share
      // one script and a repeated id meets its own earlier claim.
      const tokens = ids.map(() => newToken());
      const pairs = ids.map((id, i) => operation(id, 'c', tokens[i]!, fingerprint, leaseMs, ttlMs));
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
  };
}
