/**
 * A fault-injection reverse proxy, for tests and demos: it stands between a
 * client and a server on 127.0.0.1 and breaks some exchanges the way real
 * networks and load balancers do, so that retry safety can be shown end to end.
 *
 * @module
 */

import { type IncomingHttpHeaders, type IncomingMessage, type Server, createServer, request as httpRequest } from 'node:http';
import { Agent } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { ConfigError } from '../errors/index.js';
import { mulberry32 } from './random.js';

/**
 * The faults the proxy can apply to one request:
 * - `drop-response`: forward, let the upstream answer (its effect is
 *   committed), then destroy the client's connection without answering;
 * - `delay`: forward, then hold the answer `ms` before sending it (past the
 *   client's timeout, typically);
 * - `fail-503`: answer 503 with `Retry-After` before forwarding: the upstream
 *   never sees the request;
 * - `retry-upstream`: send the request upstream twice, one after the other,
 *   and return the second answer (a load balancer's `proxy_next_upstream`).
 */
export type FaultName = 'drop-response' | 'delay' | 'fail-503' | 'retry-upstream';

/** One fault with its parameters; `'none'` forwards the request untouched. */
export type Fault =
  | FaultName
  | 'none'
  | { fault: 'delay'; ms?: number }
  | { fault: 'fail-503'; retryAfter?: number }
  | { fault: 'drop-response' | 'retry-upstream' | 'none' };

/** What a plan function sees of a request (its body is fully read). */
export interface FaultRequest {
  /** The method, as received. */
  readonly method: string;
  /** Path and query, as received. */
  readonly url: string;
  /** The headers, as node:http parsed them (lower-case names). */
  readonly headers: IncomingHttpHeaders;
  /** The whole request body. */
  readonly body: Buffer;
}

/**
 * Which request gets which fault:
 * - a function of the request and its index `n` (0 for the first request the proxy receives);
 * - an array: request `n` gets `plan[n]`, requests past the end none;
 * - `{ probabilities, seed }`: each request draws one fault with the given
 *   probabilities (summing to at most 1), from a PRNG seeded with `seed`
 *   (default 1), so a run is reproducible.
 */
export type FaultPlan =
  | ((request: FaultRequest, n: number) => Fault | undefined)
  | readonly Fault[]
  | { probabilities: Partial<Record<FaultName, number>>; seed?: number };

/** Options of {@link startFaultProxy}. */
export interface FaultProxyOptions {
  /** The upstream base URL, e.g. `http://127.0.0.1:3000`. */
  target: string;
  /** Port to listen on, on 127.0.0.1 [0: any free port]. */
  port?: number;
  /** Which requests to break. */
  faults: FaultPlan;
  /** Default hold of `delay`, in ms [1000]. */
  delayMs?: number;
  /** Default `Retry-After` of `fail-503`, in seconds [1]. */
  retryAfter?: number;
}

/** Counts of what the proxy did; a live object, updated as requests pass. */
export interface FaultProxyStats {
  /** Requests received from clients. */
  requests: number;
  /** Requests sent upstream (`retry-upstream` sends two). */
  forwarded: number;
  /** Requests passed through untouched. */
  none: number;
  /** Answers dropped after the upstream answered. */
  'drop-response': number;
  /** Answers held back. */
  delay: number;
  /** Requests answered 503 without reaching the upstream. */
  'fail-503': number;
  /** Requests sent upstream twice. */
  'retry-upstream': number;
}

/** A running proxy. */
export interface FaultProxy {
  /** The proxy's base URL (`http://127.0.0.1:<port>`): use it in place of the target's. */
  readonly url: string;
  /** Live counts of the faults applied. */
  readonly stats: Readonly<FaultProxyStats>;
  /** Stops listening, drops open connections and pending delays, and resolves when closed. */
  close(): Promise<void>;
}

/** Hop-by-hop headers (RFC 9110 §7.6.1) a proxy must not forward. */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
]);

interface UpstreamAnswer {
  status: number;
  statusMessage: string;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

/**
 * Starts a fault-injection reverse proxy on 127.0.0.1 in front of `target`.
 *
 * @example
 * ```ts
 * import { startFaultProxy } from './src/testing/fault-proxy.js';
 * import { createClient } from 'oncely/client';
 *
 * // the first request reaches the server, but its answer is lost
 * const proxy = await startFaultProxy({ target: 'http://127.0.0.1:3000', faults: ['drop-response'] });
 * const res = await createClient().fetch(`${proxy.url}/payments`, { method: 'POST', body: '{"amount":1}' });
 * console.log(res.attempts, res.replayed, proxy.stats['drop-response']); // 2 true 1
 * await proxy.close();
 * ```
 */
export async function startFaultProxy(options: FaultProxyOptions): Promise<FaultProxy> {
  const target = new URL(options.target);
  if (target.protocol !== 'http:') throw new ConfigError('startFaultProxy: the target must be an http:// URL.');
  const choose = planner(options.faults);
  const defaultDelayMs = options.delayMs ?? 1000;
  const defaultRetryAfter = options.retryAfter ?? 1;
  const agent = new Agent({ keepAlive: true });
  const stats: FaultProxyStats = {
    requests: 0,
    forwarded: 0,
    none: 0,
    'drop-response': 0,
    delay: 0,
    'fail-503': 0,
    'retry-upstream': 0,
  };
  const sockets = new Set<Socket>();
  const timers = new Set<NodeJS.Timeout>();
  let closing = false;

  const forward = (incoming: FaultRequest): Promise<UpstreamAnswer> =>
    new Promise((resolve, reject) => {
      stats.forwarded++;
      const headers: IncomingHttpHeaders = {};
      for (const [name, value] of Object.entries(incoming.headers)) {
        if (!HOP_BY_HOP.has(name)) headers[name] = value;
      }
      headers.host = target.host;
      headers['content-length'] = String(incoming.body.length);
      const basePath = target.pathname === '/' ? '' : target.pathname.replace(/\/$/, '');
      const upstream = httpRequest(
        {
          agent,
          protocol: target.protocol,
          hostname: target.hostname,
          port: target.port,
          method: incoming.method,
          path: basePath + incoming.url,
          headers,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (chunk: Buffer) => chunks.push(chunk));
          res.on('end', () =>
            resolve({
              status: res.statusCode ?? 502,
              statusMessage: res.statusMessage ?? '',
              headers: res.headers,
              body: Buffer.concat(chunks),
            }),
          );
          res.on('error', reject);
        },
      );
      upstream.on('error', reject);
      upstream.end(incoming.body);
    });

  const server: Server = createServer((req, res) => {
    const n = stats.requests++;
    readBody(req).then(
      async (body) => {
        const incoming: FaultRequest = { method: req.method ?? 'GET', url: req.url ?? '/', headers: req.headers, body };
        let fault: ChosenFault;
        try {
          fault = normalise(choose(incoming, n));
        } catch (error) {
          // A broken plan answers 500 with the reason, rather than crash the test process.
          res.writeHead(500, { 'content-type': 'text/plain' });
          res.end(`fault proxy: ${error instanceof Error ? error.message : String(error)}`);
          return;
        }
        stats[fault.name]++;
        if (fault.name === 'fail-503') {
          const retryAfter = fault.retryAfter ?? defaultRetryAfter;
          const text = JSON.stringify({ title: 'Injected by the oncely fault proxy', status: 503 });
          res.writeHead(503, {
            'content-type': 'application/json',
            'retry-after': String(retryAfter),
            'content-length': Buffer.byteLength(text),
          });
          res.end(text);
          return;
        }
        let answer: UpstreamAnswer;
        try {
          answer = await forward(incoming);
          if (fault.name === 'retry-upstream') answer = await forward(incoming);
        } catch {
          if (!res.headersSent && !res.destroyed) {
            res.writeHead(502, { 'content-type': 'text/plain' });
            res.end('fault proxy: upstream unreachable');
          }
          return;
        }
        if (fault.name === 'drop-response') {
          req.socket.destroy();
          return;
        }
        if (fault.name === 'delay') {
          const ms = fault.ms ?? defaultDelayMs;
          await new Promise<void>((resolve) => {
            const timer = setTimeout(() => {
              timers.delete(timer);
              resolve();
            }, ms);
            timers.add(timer);
          });
          if (closing) return;
        }
        if (res.destroyed) return;
        const headers: IncomingHttpHeaders = {};
        for (const [name, value] of Object.entries(answer.headers)) {
          if (!HOP_BY_HOP.has(name)) headers[name] = value;
        }
        headers['content-length'] = String(answer.body.length);
        res.writeHead(answer.status, answer.statusMessage, headers);
        res.end(answer.body);
      },
      () => req.socket.destroy(),
    ).catch(() => req.socket.destroy());
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}`,
    stats,
    close: () => {
      closing = true;
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const socket of sockets) socket.destroy();
      agent.destroy();
      return closed;
    },
  };
}

/** A fault reduced to its name and parameters. */
interface ChosenFault {
  name: FaultName | 'none';
  ms?: number;
  retryAfter?: number;
}

const FAULT_NAMES: ReadonlySet<string> = new Set(['none', 'drop-response', 'delay', 'fail-503', 'retry-upstream']);

function normalise(fault: Fault | undefined): ChosenFault {
  if (fault === undefined) return { name: 'none' };
  const name = typeof fault === 'string' ? fault : fault?.fault;
  // A plan is test code: a typo must fail loudly, not silently pass requests through.
  if (!FAULT_NAMES.has(name)) throw new ConfigError(`startFaultProxy: unknown fault ${JSON.stringify(fault)}.`);
  if (typeof fault === 'string') return { name: fault };
  const chosen: ChosenFault = { name: fault.fault };
  if ('ms' in fault && fault.ms !== undefined) chosen.ms = fault.ms;
  if ('retryAfter' in fault && fault.retryAfter !== undefined) chosen.retryAfter = fault.retryAfter;
  return chosen;
}

function planner(plan: FaultPlan): (request: FaultRequest, n: number) => Fault | undefined {
  if (typeof plan === 'function') return plan;
  if (Array.isArray(plan)) return (_request, n) => plan[n];
  const { probabilities, seed = 1 } = plan as { probabilities: Partial<Record<FaultName, number>>; seed?: number };
  const entries = Object.entries(probabilities) as [FaultName, number][];
  const total = entries.reduce((sum, [, p]) => sum + p, 0);
  if (entries.some(([, p]) => !(p >= 0)) || total > 1 + 1e-9) {
    throw new ConfigError('startFaultProxy: probabilities must be >= 0 and sum to at most 1.');
  }
  const random = mulberry32(seed);
  return () => {
    let draw = random();
    for (const [name, p] of entries) {
      if (draw < p) return name;
      draw -= p;
    }
    return 'none';
  };
}

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}
