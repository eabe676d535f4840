/**
 * Load generation with autocannon's programmatic API (in the harness
 * process, never in a server's), and the statistics of several rounds.
 */
import { randomUUID } from 'node:crypto';
import autocannon from 'autocannon';

export type Path = 'miss' | 'replay';

export interface RunResult {
  rps: number;
  p50: number;
  p99: number;
  requests: number;
  non2xx: number;
  errors: number;
  timeouts: number;
}

export interface LoadOptions {
  url: string;
  path: Path;
  durationS: number;
  connections: number;
  /** Key of the replay path (primed beforehand). */
  replayKey?: string;
  /** Start of every generated key, so that Redis keys can be found and counted. */
  keyPrefix?: string;
  /** Request path. Default `/payments`. */
  route?: string;
}

export const BODY = JSON.stringify({ amount: 1250, currency: 'EUR' });
export const ACCOUNT = 'acct_bench';

/** Headers every request carries (the account is the oncely scope). */
export function baseHeaders(): Record<string, string> {
  return { 'content-type': 'application/json', 'x-account': ACCOUNT };
}

/** Run one load of `durationS` seconds; the miss path sends a new key on every request. */
export async function load(options: LoadOptions): Promise<RunResult> {
  const prefix = options.keyPrefix ?? `k-${randomUUID().slice(0, 8)}-`;
  let seq = 0;
  const headers = baseHeaders();
  const request: autocannon.Request =
    options.path === 'miss'
      ? {
          method: 'POST',
          path: options.route ?? '/payments',
          body: BODY,
          // A new key per request, generated as the request is built.
          setupRequest: (req) => {
            seq += 1;
            return { ...req, headers: { ...headers, 'idempotency-key': `${prefix}${seq}` } };
          },
        }
      : {
          method: 'POST',
          path: options.route ?? '/payments',
          body: BODY,
          headers: { ...headers, 'idempotency-key': options.replayKey ?? `${prefix}replay` },
        };
  const result = await autocannon({
    url: options.url,
    connections: options.connections,
    duration: options.durationS,
    requests: [request],
  });
  return {
    rps: result.requests.average,
    p50: result.latency.p50,
    p99: result.latency.p99,
    requests: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
  };
}

/** Send one request and answer status, headers and body. */
export async function send(
  url: string,
  key: string | undefined,
  body: string = BODY,
  route = '/payments',
): Promise<{ status: number; headers: Headers; body: string }> {
  const headers: Record<string, string> = baseHeaders();
  if (key !== undefined) headers['idempotency-key'] = key;
  const res = await fetch(`${url}${route}`, { method: 'POST', headers, body });
  return { status: res.status, headers: res.headers, body: await res.text() };
}

export interface Summary {
  median: number;
  min: number;
  max: number;
}

/** Median and range of several rounds. */
export function summarise(values: number[]): Summary {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  const median = sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { median, min: sorted[0] ?? Number.NaN, max: sorted[sorted.length - 1] ?? Number.NaN };
}

/** `12 345 (12 000–12 600)` */
export function fmtRange(s: Summary, digits = 0): string {
  const f = (n: number) => n.toFixed(digits);
  return `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
}

/** A markdown table. */
export function table(head: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.join(' | ')} |`;
  return [line(head), line(head.map(() => '---')), ...rows.map(line)].join('\n');
}

/** GET `/__count` of a server (executions and store calls). */
export interface Counts {
  total: number;
  keys: Record<string, number>;
  /** CPU time the server process has used so far, µs. */
  cpuUs: number;
  /** Garbage-collection pauses of the server process so far, µs (absent for servers that do not report them). */
  gcUs?: number;
  store?: Record<string, number>;
}

export async function counts(url: string, keys?: string[]): Promise<Counts> {
  const q = keys && keys.length > 0 ? `?keys=${encodeURIComponent(keys.join(','))}` : '';
  const res = await fetch(`${url}/__count${q}`);
  return (await res.json()) as Counts;
}

/** CPU time the Redis server has used so far (user + system), µs, from `INFO cpu`. */
export async function redisCpuUs(client: { info(section: string): Promise<string> }): Promise<number> {
  const info = await client.info('cpu');
  const field = (name: string) => Number(new RegExp(`${name}:([\\d.]+)`).exec(info)?.[1] ?? Number.NaN);
  return (field('used_cpu_user') + field('used_cpu_sys')) * 1e6;
}
