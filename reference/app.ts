/**
 * The reference system as a Fastify app: payments, trades, orders and
 * users behind a demo bearer token, with every POST made idempotent by the
 * `oncely` plugin, scoped to the caller's account. See docs/reference.md.
 *
 * @example
 * ```ts
 * import { startReference } from './reference/app.js';
 * const ref = await startReference({ storeUrl: 'memory:', dataDir: '/tmp/ref', port: 0 });
 * console.log(ref.url); // http://127.0.0.1:54321
 * await ref.close();
 * ```
 * @module
 */
import type { AddressInfo, Socket } from 'node:net';
import Fastify, { type FastifyInstance } from 'fastify';
import type { IdempotencyStore } from 'oncely';
import { oncely } from 'oncely/fastify';
import { type EncryptionKey, encryptionKeysFromEnv, withEncryption } from 'oncely/stores/encryption';
import { type BusinessDb, openBusinessDb, sameDatabase } from './db.js';
import { orderRoutes } from './orders.js';
import { openApiRoutes } from './openapi.js';
import { createLedger, type Ledger } from './ledger/index.js';
import { paymentRoutes } from './payments.js';
import { clientErrorProblem, frameworkErrorProblem, installProblemHandlers, problem, sendProblem } from './problem.js';
import { DEFAULT_STORE_URL, type OpenedStore, openStore } from './store-url.js';
import { tradeRoutes } from './trades.js';
import { userRoutes } from './users.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The account named by the bearer token (the idempotency scope). */
    account: string;
  }
}

/** Options of {@link buildApp} and {@link startReference}; env names in brackets. */
export interface ReferenceOptions {
  /** Where idempotency records live [`STORE_URL`, default `sqlite:./data/oncely.db`]. */
  storeUrl?: string;
  /** A store to use instead of `storeUrl` (tests); it is not closed by the app. */
  store?: IdempotencyStore;
  /** Directory of the default business database `reference.db` [`DATA_DIR`, default `./data`]. */
  dataDir?: string;
  /**
   * The business database [`DATABASE_URL`]: `sqlite:<path>`, `postgres://…`
   * or `mysql://…`; default `sqlite:<dataDir>/reference.db`.
   */
  databaseUrl?: string;
  /** Prefix of the business tables' names [`DATABASE_TABLE_PREFIX`, default none]; tests use one per run. */
  tablePrefix?: string;
  /**
   * Transactional mode [`TRANSACTIONAL`, default `auto`]: payments, trades
   * and orders write their rows in the store's transaction, committed with
   * the record's completion. `auto`: when `storeUrl` names the same
   * PostgreSQL or MySQL database as `databaseUrl` and the store has
   * transactions; `on`: the same, but start-up fails when it cannot apply;
   * `off`: never.
   */
  transactional?: 'auto' | 'on' | 'off';
  /**
   * A fault hook for crash tests [`FAULT`]: the process SIGKILLs itself at
   * that point (see {@link FAULTS}). Never set it in production.
   */
  fault?: Fault;
  /** [`HOST`, default `127.0.0.1`] */
  host?: string;
  /** [`PORT`, default 3000; 0 picks a free port] */
  port?: number;
  /** Lease of an idempotent request, ms [`LEASE_MS`, default 30000]. */
  leaseMs?: number;
  /** `false` switches the idempotency layer off: keys are ignored [`IDEMPOTENCY=off`]. */
  idempotency?: boolean;
  /** Wait this long for an in-flight duplicate and replay its answer, instead of a 409 [`WAIT_MS`]. */
  waitMs?: number;
  /** The payment handler sleeps this long before charging: a slow PSP [`PAYMENT_DELAY_MS`]. */
  paymentDelayMs?: number;
  /** The payment handler sleeps this long after committing, before answering [`PAYMENT_DELAY_AFTER_MS`]. */
  paymentDelayAfterMs?: number;
  /** The order handler sleeps this long after paying, before recording the order [`ORDER_DELAY_MS`]. */
  orderDelayMs?: number;
  /** Largest request body, bytes [`BODY_LIMIT`, default 1 MiB]. */
  bodyLimit?: number;
  /** Fastify request logging [`LOG=1`]. */
  logger?: boolean;
  /** Where orders pay: the base URL of the payments service [`PAYMENTS_URL`]; default: the address it listens on. */
  baseUrl?: string;
  /**
   * The ledger (default on): payments record a `payment.succeeded` event in
   * its outbox inside the payment transaction, it applies each event once,
   * and `GET /ledger` shows the caller's entries. `false` leaves it out.
   */
  ledger?: boolean;
  /** Where payment events travel: `amqp://`, `nats://`, `redis://`; none: in-process [`BROKER_URL`]. */
  brokerUrl?: string;
  /**
   * Seal stored outcomes with these keys (the first seals, all open), on
   * whatever store is used [`ONCELY_ENCRYPTION_KEY`: base64 keys of 32
   * bytes, comma-separated]. None: outcomes are stored in plain text.
   */
  encryptionKeys?: readonly EncryptionKey[];
  /** The request's headers must arrive within this, ms [`HEADERS_TIMEOUT_MS`, default 10000]. */
  headersTimeoutMs?: number;
  /** The whole request, headers and body, must arrive within this, ms [`REQUEST_TIMEOUT_MS`, default 30000]. */
  requestTimeoutMs?: number;
  /** A connection silent this long is closed, between requests or within one, ms [`IDLE_TIMEOUT_MS`, default 60000]. */
  idleTimeoutMs?: number;
  /** Requests served on one connection before it is closed [`MAX_REQUESTS_PER_SOCKET`, default 1000]. */
  maxRequestsPerSocket?: number;
}

/** Defaults of the connection limits (see docs/reference.md). */
export const CONNECTION_DEFAULTS = {
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
  idleTimeoutMs: 60_000,
  maxRequestsPerSocket: 1_000,
} as const;

/**
 * The fault hooks (`FAULT`): where a crash test makes the process SIGKILL
 * itself. `after-business-write` (optionally `:payments`, `:trades`,
 * `:orders`): once the handler's rows are written (in plain mode committed;
 * in transactional mode inside the open transaction, not yet committed) and
 * before the record's completion. `after-step:reserve`, `after-step:pay`:
 * once that step of an order has completed and its result is stored.
 */
export const FAULTS = [
  'after-business-write',
  'after-business-write:payments',
  'after-business-write:trades',
  'after-business-write:orders',
  'after-step:reserve',
  'after-step:pay',
] as const;

/** One of {@link FAULTS}. */
export type Fault = (typeof FAULTS)[number];

/** What the route modules share. */
export interface RouteContext {
  db: BusinessDb;
  /** Write business rows through `req.idempotency.transaction()` (see {@link ReferenceOptions.transactional}). */
  transactional: boolean;
  ledger: Ledger | undefined;
  /** The fault hook: SIGKILL this process when `FAULT` names `point` (alone or as `point:resource`). */
  crash(resource: 'payments' | 'trades' | 'orders', point: string): Promise<void>;
  paymentDelayMs: number;
  paymentDelayAfterMs: number;
  orderDelayMs: number;
  /** The app's own base URL (known once it listens). */
  baseUrl(): string;
}

/** `Authorization: Bearer <account>`, the account being 1-64 of `[A-Za-z0-9_-]`. */
const BEARER = /^Bearer +([A-Za-z0-9_-]{1,64}) *$/i;

function ownUrl(app: FastifyInstance): string {
  const address = app.server.address() as AddressInfo | string | null;
  if (address === null || typeof address === 'string') {
    throw new Error('the reference app is not listening on a TCP port, so it cannot call itself');
  }
  const host =
    address.address === '0.0.0.0' || address.address === '::'
      ? '127.0.0.1'
      : address.family === 'IPv6'
        ? `[${address.address}]`
        : address.address;
  return `http://${host}:${address.port}`;
}

/**
 * Build the reference app, ready to listen: opens the store and the
 * business database (both closed by `app.close()`).
 */
export async function buildApp(options: ReferenceOptions = {}): Promise<FastifyInstance> {
  const opened: OpenedStore | undefined = options.store ? undefined : await openStore(options.storeUrl ?? DEFAULT_STORE_URL);
  let store: IdempotencyStore;
  try {
    const base = options.store ?? opened!.store;
    store = options.encryptionKeys ? withEncryption(base, { keys: options.encryptionKeys }) : base;
  } catch (error) {
    await opened?.close();
    throw error;
  }
  let db: BusinessDb;
  try {
    db = await openBusinessDb({ url: options.databaseUrl, dataDir: options.dataDir, prefix: options.tablePrefix });
  } catch (error) {
    await opened?.close();
    throw error;
  }
  let ledger: Ledger | undefined;
  let mode: { on: boolean; why: string };
  try {
    mode = transactionalMode(options, store, db);
    ledger = options.ledger === false ? undefined : createLedger({ db, brokerUrl: options.brokerUrl });
  } catch (error) {
    await db.close();
    await opened?.close();
    throw error;
  }

  let app: FastifyInstance;
  try {
    app = makeFastify(options);
  } catch (error) {
    await ledger?.stop();
    await db.close();
    await opened?.close();
    throw error;
  }
  // Closes what this function opened, once: on app.close(), or when building fails.
  let cleaned = false;
  const cleanup = async (): Promise<void> => {
    if (cleaned) return;
    cleaned = true;
    try {
      if (ledger) await ledger.stop();
      await opened?.close();
    } finally {
      await db.close();
    }
  };
  app.addHook('onClose', cleanup);
  try {
    await setUp(app, options, { store, opened, db, ledger, transactional: mode.on });
    described.set(app, { database: db.description, transactional: mode });
    await app.ready();
  } catch (error) {
    await app.close().catch(() => {});
    await cleanup().catch(() => {});
    throw error;
  }
  return app;
}

/**
 * Whether payments, trades and orders run in transactional mode, and why
 * (for the start-up line): the store must be the business database (same
 * dialect, server, user and database) and offer transactions. SQLite keeps
 * plain mode: the business tables are written over a second connection to
 * the file, and SQLite has one writer, so a write there while the store's
 * transaction holds the lock would block the event loop.
 *
 * @throws Error with `transactional: 'on'` when it cannot apply.
 */
export function transactionalMode(
  options: ReferenceOptions,
  store: IdempotencyStore,
  db: Pick<BusinessDb, 'dialect' | 'url'>,
): { on: boolean; why: string } {
  const setting = options.transactional ?? 'auto';
  const mode = ((): { on: boolean; why: string } => {
    if (setting === 'off') return { on: false, why: 'TRANSACTIONAL=off' };
    if (options.idempotency === false) return { on: false, why: 'idempotency off' };
    if (options.store !== undefined) return { on: false, why: 'a store given in code, not by URL' };
    if (db.dialect === 'sqlite') return { on: false, why: 'SQLite business database' };
    if (!sameDatabase(options.storeUrl ?? DEFAULT_STORE_URL, db.url)) return { on: false, why: 'STORE_URL is another database' };
    if (store.transactions === undefined) return { on: false, why: `the ${store.name} store has no transactions` };
    return { on: true, why: 'STORE_URL is the business database' };
  })();
  if (setting === 'on' && !mode.on) throw new Error(`TRANSACTIONAL=on, but transactional mode cannot apply: ${mode.why}`);
  return mode;
}

/** SIGKILL this process at `point` when `fault` names it (see {@link FAULTS}). */
async function crashAt(fault: Fault | undefined, resource: string, point: string): Promise<void> {
  if (fault === undefined || (fault !== point && fault !== `${point}:${resource}`)) return;
  console.error(`[reference] FAULT=${fault}: SIGKILL in ${resource} at ${point}`);
  process.kill(process.pid, 'SIGKILL');
  await new Promise(() => {}); // the signal is on its way: never go on
}

/** The Fastify instance with the reference's server options. */
function makeFastify(options: ReferenceOptions): FastifyInstance {
  const headersTimeout = options.headersTimeoutMs ?? CONNECTION_DEFAULTS.headersTimeoutMs;
  const requestTimeout = options.requestTimeoutMs ?? CONNECTION_DEFAULTS.requestTimeoutMs;
  const idleTimeout = options.idleTimeoutMs ?? CONNECTION_DEFAULTS.idleTimeoutMs;
  if (headersTimeout > requestTimeout) {
    throw new Error(`the headers timeout (${headersTimeout} ms) cannot be longer than the request timeout (${requestTimeout} ms)`);
  }
  return Fastify({
    // A client that never finishes its headers or its body, or goes silent,
    // loses its connection (and the descriptor it holds) on time.
    http: {
      headersTimeout,
      requestTimeout,
      // Node checks those two deadlines on this interval (default 30 s, which
      // would let a 10 s deadline run to 40 s).
      connectionsCheckingInterval: Math.min(1_000, Math.max(25, Math.floor(headersTimeout / 4))),
    },
    requestTimeout,
    connectionTimeout: idleTimeout,
    keepAliveTimeout: idleTimeout,
    maxRequestsPerSocket: options.maxRequestsPerSocket ?? CONNECTION_DEFAULTS.maxRequestsPerSocket,
    logger: options.logger ?? false,
    bodyLimit: options.bodyLimit ?? 1024 * 1024,
    // Amounts must be numbers, not strings that look like numbers: no coercion, nothing dropped silently.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: true } },
    // Requests arriving while closing get a problem+json 503 from the hook below instead.
    return503OnClosing: false,
    frameworkErrors: frameworkErrorProblem,
    clientErrorHandler: clientErrorProblem,
  });
}

/** Hooks, the oncely plugin and the routes. */
async function setUp(
  app: FastifyInstance,
  options: ReferenceOptions,
  parts: { store: IdempotencyStore; opened: OpenedStore | undefined; db: BusinessDb; ledger: Ledger | undefined; transactional: boolean },
): Promise<void> {
  const { store, opened, db, ledger, transactional } = parts;
  installProblemHandlers(app);

  // Graceful shutdown: requests arriving while closing are refused (nothing
  // runs), and every answer sent while closing ends its connection, so that
  // a keep-alive client does not hold the server open after the last one.
  let closing = false;
  app.addHook('preClose', async () => {
    closing = true;
  });
  app.addHook('onSend', async (_request, reply, payload) => {
    if (closing) reply.header('connection', 'close');
    return payload;
  });

  // Node answers the last request a socket may carry with `Connection:
  // close` but then keeps the socket open until the idle timeout: end it
  // once that answer is out.
  const maxRequestsPerSocket = options.maxRequestsPerSocket ?? CONNECTION_DEFAULTS.maxRequestsPerSocket;
  const served = new WeakMap<Socket, number>();
  app.addHook('onResponse', async (request) => {
    const socket = request.raw.socket;
    const count = (served.get(socket) ?? 0) + 1;
    served.set(socket, count);
    if (count >= maxRequestsPerSocket) socket.destroySoon();
  });

  app.decorateRequest('account', '');
  // Auth first (onRequest runs before body parsing and before oncely's preHandler).
  app.addHook('onRequest', async (request, reply) => {
    if (closing) {
      return sendProblem(reply, problem('shutting-down', 'The server is shutting down; retry shortly.'), {
        'retry-after': '1',
      });
    }
    if (request.url === '/healthz' || request.url.startsWith('/healthz?')) return;
    const header = request.headers.authorization;
    const match = typeof header === 'string' ? BEARER.exec(header) : null;
    if (!match) {
      // Closed after the answer: an unauthenticated client keeps no socket
      // (and sends no body we would have to read).
      return sendProblem(
        reply,
        problem(
          'unauthorized',
          header === undefined
            ? 'Send Authorization: Bearer <account>, where <account> is 1-64 characters of [A-Za-z0-9_-].'
            : 'The bearer token is malformed: it must be 1-64 characters of [A-Za-z0-9_-].',
        ),
        { 'www-authenticate': 'Bearer realm="oncely-reference"', connection: 'close' },
      );
    }
    request.account = match[1]!;
  });

  if (options.idempotency !== false) {
    await app.register(oncely, {
      store,
      methods: ['POST'],
      scope: (request) => request.account,
      leaseMs: options.leaseMs ?? 30_000,
      wait: options.waitMs ? { timeoutMs: options.waitMs } : false,
    });
  }

  await openApiRoutes(app, options); // GET /openapi.json, made from the routes registered below
  const ctx: RouteContext = {
    db,
    transactional,
    ledger,
    crash: (resource, point) => crashAt(options.fault, resource, point),
    paymentDelayMs: options.paymentDelayMs ?? 0,
    paymentDelayAfterMs: options.paymentDelayAfterMs ?? 0,
    orderDelayMs: options.orderDelayMs ?? 0,
    baseUrl: () => options.baseUrl ?? ownUrl(app),
  };

  app.get('/healthz', async () => ({
    status: 'ok',
    store: opened?.kind ?? store.name,
    database: db.dialect,
    transactional,
    idempotency: options.idempotency !== false,
  }));
  await app.register(async (scoped) => {
    await paymentRoutes(scoped, ctx);
    await tradeRoutes(scoped, ctx);
    await userRoutes(scoped, ctx);
    await orderRoutes(scoped, ctx);
  });

  if (ledger) {
    app.addHook('onReady', async () => {
      await ledger.start();
    });
  }
}

/** What the start-up line says about an app {@link buildApp} made. */
const described = new WeakMap<FastifyInstance, { database: string; transactional: { on: boolean; why: string } }>();

/** A running reference system (see {@link startReference}). */
export interface RunningReference {
  /** Base URL, e.g. `http://127.0.0.1:3000`. */
  url: string;
  app: FastifyInstance;
  /** The business database, without its password. */
  database: string;
  /** Whether transactional mode applies, and why. */
  transactional: { on: boolean; why: string };
  /** Stop accepting requests, finish those in flight, close the store and database. */
  close(): Promise<void>;
}

/** Build the app and listen on `host`:`port` (default 127.0.0.1:3000; port 0 picks one). */
export async function startReference(options: ReferenceOptions = {}): Promise<RunningReference> {
  const app = await buildApp(options);
  try {
    await app.listen({ host: options.host ?? '127.0.0.1', port: options.port ?? 3000 });
  } catch (error) {
    await app.close();
    throw error;
  }
  const url = ownUrl(app);
  return { url, app, ...described.get(app)!, close: () => app.close() };
}

function envNumber(env: NodeJS.ProcessEnv, name: string, min: number): number | undefined {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') return undefined;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min) {
    throw new Error(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`);
  }
  return value;
}

/** Read {@link ReferenceOptions} from the environment (see docs/reference.md). */
export function referenceOptionsFromEnv(env: NodeJS.ProcessEnv = process.env): ReferenceOptions {
  const idempotency = (env.IDEMPOTENCY ?? 'on').toLowerCase();
  if (!['on', 'off', 'true', 'false', '1', '0'].includes(idempotency)) {
    throw new Error(`IDEMPOTENCY must be on or off, got ${JSON.stringify(env.IDEMPOTENCY)}`);
  }
  const transactional = (env.TRANSACTIONAL || 'auto').toLowerCase();
  if (transactional !== 'auto' && transactional !== 'on' && transactional !== 'off') {
    throw new Error(`TRANSACTIONAL must be auto, on or off, got ${JSON.stringify(env.TRANSACTIONAL)}`);
  }
  const fault = env.FAULT || undefined;
  if (fault !== undefined && !(FAULTS as readonly string[]).includes(fault)) {
    throw new Error(`FAULT must be one of ${FAULTS.join(', ')}, got ${JSON.stringify(fault)}`);
  }
  const encryptionKey = env.ONCELY_ENCRYPTION_KEY;
  const options: ReferenceOptions = {
    storeUrl: env.STORE_URL || DEFAULT_STORE_URL,
    dataDir: env.DATA_DIR || './data',
    databaseUrl: env.DATABASE_URL || undefined,
    tablePrefix: env.DATABASE_TABLE_PREFIX || undefined,
    transactional,
    fault: fault as Fault | undefined,
    baseUrl: env.PAYMENTS_URL || undefined,
    host: env.HOST || '127.0.0.1',
    port: envNumber(env, 'PORT', 0) ?? 3000,
    leaseMs: envNumber(env, 'LEASE_MS', 1) ?? 30_000,
    idempotency: !['off', 'false', '0'].includes(idempotency),
    waitMs: envNumber(env, 'WAIT_MS', 0),
    paymentDelayMs: envNumber(env, 'PAYMENT_DELAY_MS', 0) ?? 0,
    paymentDelayAfterMs: envNumber(env, 'PAYMENT_DELAY_AFTER_MS', 0) ?? 0,
    orderDelayMs: envNumber(env, 'ORDER_DELAY_MS', 0) ?? 0,
    bodyLimit: envNumber(env, 'BODY_LIMIT', 1) ?? 1024 * 1024,
    logger: env.LOG === '1' || env.LOG === 'true',
    brokerUrl: env.BROKER_URL || undefined,
    // Set but empty is a mistake (a missing secret in a deployment), not "off".
    encryptionKeys: encryptionKey === undefined ? undefined : encryptionKeysFromEnv(encryptionKey, 'ONCELY_ENCRYPTION_KEY'),
    headersTimeoutMs: envNumber(env, 'HEADERS_TIMEOUT_MS', 1) ?? CONNECTION_DEFAULTS.headersTimeoutMs,
    requestTimeoutMs: envNumber(env, 'REQUEST_TIMEOUT_MS', 1) ?? CONNECTION_DEFAULTS.requestTimeoutMs,
    idleTimeoutMs: envNumber(env, 'IDLE_TIMEOUT_MS', 1) ?? CONNECTION_DEFAULTS.idleTimeoutMs,
    maxRequestsPerSocket: envNumber(env, 'MAX_REQUESTS_PER_SOCKET', 1) ?? CONNECTION_DEFAULTS.maxRequestsPerSocket,
  };
  if (options.headersTimeoutMs! > options.requestTimeoutMs!) {
    throw new Error(
      `HEADERS_TIMEOUT_MS (${options.headersTimeoutMs}) cannot be longer than REQUEST_TIMEOUT_MS (${options.requestTimeoutMs})`,
    );
  }
  return options;
}
