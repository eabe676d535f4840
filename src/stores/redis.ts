/**
 * Redis store: records live in Redis (standalone or Cluster), through the
 * client you already have: ioredis (`Redis`, `Cluster`) or node-redis v4/v5
 * (`createClient`, `createCluster`). Neither package is a dependency; the
 * client is recognised by its shape.
 *
 * Every operation is one Lua script (EVALSHA, falling back to EVAL once per
 * server when the script cache is empty), so each is atomic and costs one
 * round trip. Lease deadlines come from the Redis server's `TIME`; records
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
} from '../engine/store.js';
import { newToken } from '../engine/token.js';
import { ConfigError } from '../errors/index.js';

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
   * cluster, `claimMany` sends one script per id, all at once, instead of one
   * script for the batch, because one script cannot touch keys in different slots.
   */
  cluster?: boolean;
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

// KEYS: the records; ARGV: fingerprint, leaseMs, ttlMs, then one token per key.
// Answers one entry per key:
//   {'a', leaseUntil, takeover}  acquired (with the token passed for that key)
//   {'c', fingerprint, expiresAt, outcome}
//   {'p', fingerprint, leaseUntil, now}
const CLAIM = `${PRELUDE}
local fp = ARGV[1]
local lease = tonumber(ARGV[2])
local keep = math.max(tonumber(ARGV[3]), lease)
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local token = ARGV[3 + i]
  local r = redis.call('HMGET', key, 's', 't', 'f', 'l', 'e', 'o', 'k')
  if not r[1] then
    redis.call('HSET', key, 's', 'p', 't', token, 'f', fp, 'l', int(now + lease), 'e', int(now + keep), 'k', '0')
    redis.call('PEXPIREAT', key, int(now + keep))
    out[i] = {'a', now + lease, 0}
  elseif r[1] == 'c' then
    out[i] = {'c', r[3] or '-', tonumber(r[5]) or 0, r[6] or ''}
  else
    local l = tonumber(r[4]) or 0
    if r[2] == token then
      -- This very claim already ran (the client resent it after a lost reply).
      out[i] = {'a', l, tonumber(r[7]) or 0}
    elseif l <= now and r[3] == fp then
      local e = math.max(tonumber(r[5]) or 0, now + keep)
      redis.call('HSET', key, 't', token, 'l', int(now + lease), 'e', int(e), 'k', '1')
      redis.call('PEXPIREAT', key, int(e))
      out[i] = {'a', now + lease, 1}
    else
      out[i] = {'p', r[3] or '-', l, now}
    end
  end
end
return out
`;

// KEYS[1]; ARGV: token, leaseMs. 1 when renewed.
const RENEW = `${PRELUDE}
local r = redis.call('HMGET', KEYS[1], 's', 't', 'e')
if r[1] ~= 'p' or r[2] ~= ARGV[1] then return 0 end
local l = now_ms() + tonumber(ARGV[2])
local e = math.max(tonumber(r[3]) or 0, l)
redis.call('HSET', KEYS[1], 'l', int(l), 'e', int(e))
redis.call('PEXPIREAT', KEYS[1], int(e))
return 1
`;

// KEYS[1]; ARGV: token, outcome, ttlMs. 1 when completed. No lease check:
// the owner may still complete after its deadline until someone takes over.
const COMPLETE = `${PRELUDE}
local r = redis.call('HMGET', KEYS[1], 's', 't')
if r[1] ~= 'p' or r[2] ~= ARGV[1] then return 0 end
local e = now_ms() + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 's', 'c', 'o', ARGV[2], 'e', int(e))
redis.call('HDEL', KEYS[1], 't', 'l', 'k')
redis.call('PEXPIREAT', KEYS[1], int(e))
return 1
`;

// KEYS[1]; ARGV: token. 1 when released.
const RELEASE = `
local r = redis.call('HMGET', KEYS[1], 's', 't')
if r[1] ~= 'p' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
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
  claim: script(CLAIM),
  renew: script(RENEW),
  complete: script(COMPLETE),
  release: script(RELEASE),
  get: script(GET),
  delete: script(DELETE),
} as const;

type Runner = (s: Script, keys: string[], args: string[]) => Promise<unknown>;

const errorMessage = (error: unknown): string =>
  typeof error === 'object' && error !== null ? String((error as { message?: unknown }).message) : String(error);

const isNoScript = (error: unknown): boolean => errorMessage(error).startsWith('NOSCRIPT');

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
  const cluster = options.cluster ?? detectCluster(client);
  const keyOf = (id: string): string => `${prefix}:{${id}}`;

  const claimBatch = async (ids: readonly string[], input: ClaimInput): Promise<ClaimResult[]> => {
    const tokens = ids.map(() => newToken());
    const args = [encodeFingerprint(input.fingerprint), ms('leaseMs', input.leaseMs), ms('ttlMs', input.ttlMs), ...tokens];
    const replies = list(await run(SCRIPTS.claim, ids.map(keyOf), args));
    if (replies.length !== ids.length) throw new Error(`redis store: ${replies.length} claim replies for ${ids.length} ids`);
    return replies.map((reply, i) => decodeClaim(reply, tokens[i]!));
  };

  return {
    name: 'redis',
    capabilities: CAPABILITIES,
    prefix,
    cluster,
    keyOf,
    async claim(id, input) {
      const [result] = await claimBatch([id], input);
      return result!;
    },
    async claimMany(ids, input) {
      if (ids.length === 0) return [];
      // One script cannot span slots; concurrent calls are pipelined by the
      // client, so a cluster batch still costs one round trip per node.
      const each = async () => (await Promise.all(ids.map((id) => claimBatch([id], input)))).map((r) => r[0]!);
      if (cluster) return each();
      try {
        return await claimBatch(ids, input);
      } catch (error) {
        // A cluster client that was not detected: the server refused the
        // batch before running it, so nothing was claimed; go id by id.
        if (ids.length > 1 && errorMessage(error).startsWith('CROSSSLOT')) return each();
        throw error;
      }
    },
    async renew(id, token, leaseMs) {
      return int(await run(SCRIPTS.renew, [keyOf(id)], [token, ms('leaseMs', leaseMs)])) === 1;
    },
    async complete(id, token, outcome, ttlMs) {
      return int(await run(SCRIPTS.complete, [keyOf(id)], [token, outcome, ms('ttlMs', ttlMs)])) === 1;
    },
    async release(id, token) {
      return int(await run(SCRIPTS.release, [keyOf(id)], [token])) === 1;
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
}
