/**
 * `oncely verify`: checks from the outside whether an HTTP endpoint honours
 * `Idempotency-Key`, with the evidence of every verdict. It works against any
 * server (oncely or not): it only sends requests and compares the answers.
 *
 * Bounded: each check sends a fixed number of requests (the concurrency check
 * `concurrency` of them), each limited by `timeoutMs`, and waits between
 * retries of an in-flight 409 are capped.
 *
 * @example
 * ```ts
 * import { verify } from './verify.js';
 * const report = await verify({
 *   url: 'http://127.0.0.1:3000/payments',
 *   headers: [['authorization', 'Bearer acct_1']],
 *   body: '{"amount": {{n}}, "currency": "EUR"}',
 * });
 * console.log(report.passed, report.checks.map((c) => `${c.name}: ${c.status}`));
 * ```
 * @module
 */

import { createHash, randomUUID } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';

/** The checks, in the order they run. */
export const CHECK_NAMES = ['missing-key', 'malformed-key', 'replay', 'reuse', 'concurrency', 'dropped-retry'] as const;

/** The name of one check. */
export type CheckName = (typeof CHECK_NAMES)[number];

/** Options of {@link verify}. */
export interface VerifyOptions {
  /** The endpoint, e.g. `http://127.0.0.1:3000/payments`. */
  url: string;
  /** Method [POST]. */
  method?: string;
  /** Extra request headers (authentication…), sent on every request. */
  headers?: ReadonlyArray<readonly [string, string]>;
  /**
   * Body template: `{{n}}` becomes the number of the logical operation and
   * `{{uuid}}` a fresh UUID, both fixed for every request of that operation
   * [`{"amount":{{n}},"currency":"EUR"}`, a payment of the reference system].
   * A function makes the body of logical operation `n` itself (called once
   * per operation). `null`: requests carry no body and no default
   * `Content-Type`, and `reuse` has nothing to vary (skip it).
   */
  body?: string | ((n: number) => string) | null;
  /** Duplicates sent at once by the concurrency check [20]. */
  concurrency?: number;
  /** Limit of one request, ms [10000]. */
  timeoutMs?: number;
  /** Limit of the whole run, ms [120000]: past it, the checks left fail without sending anything. */
  maxTimeMs?: number;
  /** Where the resource id is in a JSON answer, dotted path [`id`]; else the `Location` header. */
  idField?: string;
  /** Checks not to run (they count neither as passed nor as failed). */
  skip?: readonly CheckName[];
}

/** The verdict of one check. */
export interface CheckResult {
  name: CheckName;
  /** What it checks, in a few words. */
  title: string;
  /** `skip`: not run, because asked (`skip`) or because it could not be run (see `summary`). */
  status: 'pass' | 'fail' | 'skip';
  /** One line: why it passed or failed. */
  summary: string;
  /**
   * A failure that says nothing about keys: the request was refused for
   * another reason (401, 403, 404, 405, a body the server rejects) or did
   * not get through. Absent on conclusive verdicts.
   */
  inconclusive?: true;
  /** What was sent and answered, one line per fact. */
  evidence: string[];
}

/** What {@link verify} found. */
export interface VerifyReport {
  url: string;
  method: string;
  /** True when every check that was not skipped on request passed. */
  passed: boolean;
  checks: CheckResult[];
  /** HTTP requests sent in all. */
  requests: number;
  durationMs: number;
}

/** The default body template: a payment of the reference system. */
export const DEFAULT_BODY = '{"amount":{{n}},"currency":"EUR"}';

const TITLES: Record<CheckName, string> = {
  'missing-key': 'no Idempotency-Key is refused (4xx)',
  'malformed-key': 'malformed keys are refused (400)',
  replay: 'same key, same body: stored answer replayed',
  reuse: 'same key, other body: 422',
  concurrency: 'concurrent duplicates make one resource',
  'dropped-retry': 'retry after a dropped connection: no second resource',
};

/** 4xx answers that refuse a request for a reason other than its key. */
const NOT_ABOUT_KEYS: ReadonlySet<number> = new Set([401, 403, 404, 405]);

/** Longest wait obeyed between retries of an in-flight answer, ms. */
const MAX_SETTLE_WAIT_MS = 2_000;
/** Attempts to get a settled answer when the first copy is still running. */
const SETTLE_ATTEMPTS = 10;

interface Answer {
  status: number;
  headers: Headers;
  text: string;
  replayed: boolean;
  /** The resource id (JSON field or Location), when there is one. */
  id: string | undefined;
}

class Failure extends Error {}

/**
 * Runs the checks against `options.url` and reports each verdict with its
 * evidence. Never throws for what the server does (a refused connection is a
 * failed check); throws only for invalid options.
 */
export async function verify(options: VerifyOptions): Promise<VerifyReport> {
  const started = performance.now();
  const url = new URL(options.url);
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new TypeError('the URL must be http:// or https://');
  const method = (options.method ?? 'POST').toUpperCase();
  const template = options.body === undefined ? DEFAULT_BODY : options.body;
  const concurrency = options.concurrency ?? 20;
  const timeoutMs = options.timeoutMs ?? 10_000;
  const idField = options.idField ?? 'id';
  if (!Number.isInteger(concurrency) || concurrency < 2 || concurrency > 1000) {
    throw new RangeError('concurrency must be an integer from 2 to 1000');
  }
  if (!(timeoutMs > 0)) throw new RangeError('timeout must be positive');
  const maxTimeMs = options.maxTimeMs ?? 120_000;
  if (!(maxTimeMs > 0)) throw new RangeError('maxTimeMs must be positive');
  const deadline = Date.now() + maxTimeMs;
  /** The limit of the next request: the per-request timeout, or what is left of the run. */
  const budget = (): number => {
    const left = deadline - Date.now();
    if (left <= 0) throw new Failure(`the time limit of the run (${maxTimeMs} ms) ran out`);
    return Math.min(timeoutMs, left);
  };
  const skip = new Set(options.skip ?? []);
  const hasBody = method !== 'GET' && method !== 'HEAD' && template !== null;
  const userHeaders = options.headers ?? [];
  const hasContentType = userHeaders.some(([name]) => name.toLowerCase() === 'content-type');
  let requests = 0;
  let n = 0;

  /** One logical operation's body: placeholders filled once. */
  const nextBody = (): string => {
    n++;
    if (template === null) return '';
    if (typeof template === 'function') return template(n);
    return template.replaceAll('{{n}}', String(n)).replaceAll('{{uuid}}', () => randomUUID());
  };

  const headersFor = (keys: readonly string[]): Headers => {
    const headers = new Headers();
    for (const [name, value] of userHeaders) headers.append(name, value);
    if (!hasContentType && hasBody) headers.set('content-type', 'application/json');
    // Appending twice sends the comma-joined list, as fetch does for repeated fields.
    for (const key of keys) headers.append('idempotency-key', key);
    return headers;
  };

  const send = async (keys: readonly string[], body: string): Promise<Answer> => {
    const limit = budget();
    requests++;
    let res: Response;
    let text: string;
    try {
      res = await fetch(url, {
        method,
        headers: headersFor(keys),
        body: hasBody ? body : undefined,
        signal: AbortSignal.timeout(limit),
      });
      text = await res.text();
    } catch (error) {
      throw new Failure(`${method} ${url.pathname} failed: ${describeError(error)}`);
    }
    return {
      status: res.status,
      headers: res.headers,
      text,
      replayed: res.headers.get('idempotent-replayed')?.trim().toLowerCase() === 'true',
      id: resourceId(text, res.headers.get('location') ?? undefined, idField),
    };
  };

  /** Sends until the answer is not "still running" (409, or 503 with Retry-After), within bounds. */
  const sendSettled = async (key: string, body: string): Promise<{ answer: Answer; waits: number }> => {
    let answer = await send([key], body);
    let waits = 0;
    while (waits < SETTLE_ATTEMPTS && (answer.status === 409 || (answer.status === 503 && answer.headers.has('retry-after')))) {
      if (answer.status === 409 && !answer.headers.has('retry-after') && !isInFlight(answer)) break; // a business conflict
      waits++;
      await sleep(Math.min(retryAfterMs(answer.headers.get('retry-after')), Math.max(0, deadline - Date.now())));
      answer = await send([key], body);
    }
    return { answer, waits };
  };

  const checks: Record<CheckName, () => Promise<Omit<CheckResult, 'name' | 'title'>>> = {
    async 'missing-key'() {
      const answer = await send([], nextBody());
      const evidence = [`without Idempotency-Key → ${describe(answer)}`];
      if (NOT_ABOUT_KEYS.has(answer.status)) {
        evidence.push('refused for another reason (authentication, URL or method): check --header and the URL');
        return { status: 'fail', summary: `${answer.status} says nothing about the key`, evidence, inconclusive: true };
      }
      if (answer.status >= 400 && answer.status < 500) {
        const ideal = answer.status === 400 && isProblem(answer);
        if (!ideal) evidence.push('(ideally 400 application/problem+json)');
        return { status: 'pass', summary: `refused with ${answer.status}`, evidence };
      }
      if (answer.status < 300) evidence.push('the request ran without a key: a retry of it could not be recognised');
      return { status: 'fail', summary: `expected 4xx, got ${answer.status}`, evidence };
    },

    async 'malformed-key'() {
      const body = nextBody();
      const variants: Array<[string, string[]]> = [
        ['empty key', ['']],
        ['256 characters', ['k'.repeat(256)]],
        ['two keys in one field', [randomUUID(), randomUUID()]],
      ];
      const evidence: string[] = [];
      let failed = 0;
      for (const [label, keys] of variants) {
        const answer = await send(keys, body);
        const ok = answer.status === 400;
        if (!ok) failed++;
        evidence.push(`${label} → ${describe(answer)}${ok ? '' : ' (expected 400)'}`);
      }
      return failed === 0
        ? { status: 'pass', summary: `all ${variants.length} refused with 400`, evidence }
        : { status: 'fail', summary: `${failed} of ${variants.length} not refused with 400`, evidence };
    },

    async replay() {
      const key = randomUUID();
      const body = nextBody();
      const first = await send([key], body);
      const evidence = [`key ${key} → ${describe(first)}`];
      if (first.status >= 300) {
        return {
          status: 'fail',
          summary: `the first request was answered ${first.status}, not a success (check --body and --header)`,
          evidence: [...evidence, `body: ${head(first.text)}`],
          inconclusive: true,
        };
      }
      const second = await send([key], body);
      evidence.push(`same key, same body → ${describe(second)}`);
      const problems: string[] = [];
      if (second.status !== first.status) problems.push(`status ${second.status} ≠ ${first.status}`);
      if (second.text !== first.text) problems.push(`body differs (${first.id ?? head(first.text)} vs ${second.id ?? head(second.text)})`);
      if (!second.replayed) problems.push('no Idempotent-Replayed: true');
      if (problems.length === 0) {
        evidence.push('same status, identical body bytes, Idempotent-Replayed: true');
        return { status: 'pass', summary: 'replayed', evidence };
      }
      return { status: 'fail', summary: problems.join('; '), evidence };
    },

    async reuse() {
      const key = randomUUID();
      const body = nextBody();
      const other = nextBody();
      if (other === body) {
        return {
          status: 'skip',
          summary:
            template === null
              ? 'the request has no body to vary'
              : typeof template === 'function'
                ? 'every operation has the same body: cannot make a different one'
                : 'the body template has no {{n}} or {{uuid}}: cannot make a different body',
          evidence: [],
        };
      }
      const first = await send([key], body);
      const evidence = [`key ${key}, body ${head(body, 60)} → ${describe(first)}`];
      if (first.status >= 300) {
        return { status: 'fail', summary: `the first request was answered ${first.status}, not a success`, evidence, inconclusive: true };
      }
      const second = await send([key], other);
      evidence.push(`same key, body ${head(other, 60)} → ${describe(second)}`);
      if (second.status === 422) return { status: 'pass', summary: 'refused with 422', evidence };
      if (second.status < 300) evidence.push(second.id === first.id ? 'the first answer was returned for another request' : 'a second resource was made under the same key');
      return { status: 'fail', summary: `expected 422, got ${second.status}`, evidence };
    },

    async concurrency() {
      const key = randomUUID();
      const body = nextBody();
      const settled = await Promise.allSettled(Array.from({ length: concurrency }, () => send([key], body)));
      const answers = settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
      const errors = settled.length - answers.length;
      const statuses = new Map<string, number>();
      for (const a of answers) {
        const label = a.status < 300 ? `${a.status}${a.replayed ? ' replayed' : ''}` : String(a.status);
        statuses.set(label, (statuses.get(label) ?? 0) + 1);
      }
      const evidence = [
        `${concurrency} at once with key ${key} → ${[...statuses].map(([s, c]) => `${c}× ${s}`).join(', ')}${errors ? `, ${errors} network errors` : ''}`,
      ];
      const { answer: after, waits } = await sendSettled(key, body);
      evidence.push(`then the same request${waits ? ` (after ${waits} in-flight answer${waits === 1 ? '' : 's'})` : ''} → ${describe(after)}`);
      const successes = [...answers, after].filter((a) => a.status >= 200 && a.status < 300);
      const ids = new Set(successes.map(identity));
      if (successes.length === 0) {
        return { status: 'fail', summary: 'no request succeeded (check --body and --header)', evidence, inconclusive: true };
      }
      if (ids.size === 1) {
        evidence.push(`every success names ${[...ids][0]}`);
        return { status: 'pass', summary: `one resource from ${successes.length} successes`, evidence };
      }
      evidence.push(`${ids.size} distinct resources: ${list([...ids])}`);
      return { status: 'fail', summary: `${ids.size} resources from one key`, evidence };
    },

    async 'dropped-retry'() {
      const key = randomUUID();
      const body = nextBody();
      const limit = budget();
      requests++;
      const dropped = await sendAndDrop(url, method, headersFor([key]), hasBody ? body : '', limit);
      if (dropped.error !== undefined) throw new Failure(`${method} ${url.pathname} failed: ${dropped.error}`);
      const firstId = dropped.raw ? parseRawAnswer(dropped.raw, idField) : undefined;
      const evidence = [
        dropped.raw
          ? `key ${key}: connection cut as the answer arrived (${firstId?.status ?? '?'}${firstId?.id ? ` id=${firstId.id}` : ''}, unread by the client)`
          : `key ${key}: connection cut after ${limit} ms without an answer`,
      ];
      const { answer: retry, waits } = await sendSettled(key, body);
      evidence.push(`retry with the same key${waits ? ` (after ${waits} in-flight answer${waits === 1 ? '' : 's'})` : ''} → ${describe(retry)}`);
      if (retry.status >= 300) {
        // When the cut answer was no success either, the request itself is refused: nothing learnt about keys.
        const refused = firstId !== undefined && firstId.status >= 300;
        return { status: 'fail', summary: `the retry was answered ${retry.status}`, evidence, ...(refused ? { inconclusive: true as const } : {}) };
      }
      if (firstId?.id !== undefined && retry.id !== undefined) {
        if (firstId.id === retry.id) return { status: 'pass', summary: `same resource ${retry.id}`, evidence };
        return { status: 'fail', summary: `a second resource: ${firstId.id} then ${retry.id}`, evidence };
      }
      if (retry.replayed) return { status: 'pass', summary: 'the retry got the replay', evidence };
      return {
        status: 'fail',
        summary: 'the retry ran again (no replay marker, no id to compare): a second resource may exist',
        evidence,
      };
    },
  };

  const results: CheckResult[] = [];
  for (const name of CHECK_NAMES) {
    const base = { name, title: TITLES[name] };
    if (skip.has(name)) {
      results.push({ ...base, status: 'skip', summary: 'skipped on request', evidence: [] });
      continue;
    }
    try {
      results.push({ ...base, ...(await checks[name]()) });
    } catch (error) {
      const message = error instanceof Failure ? error.message : describeError(error);
      results.push({ ...base, status: 'fail', summary: 'a request failed', evidence: [message], inconclusive: true });
    }
  }
  return {
    url: url.toString(),
    method,
    passed: results.every((r) => r.status === 'pass' || (r.status === 'skip' && skip.has(r.name))),
    checks: results,
    requests,
    durationMs: Math.round(performance.now() - started),
  };
}

/**
 * Sends one request on its own connection and destroys the connection as soon
 * as the first byte of the answer arrives (or after `timeoutMs` without one):
 * the server has committed, the client never reads the answer. What had
 * arrived is kept as evidence of what the server made.
 */
function sendAndDrop(
  url: URL,
  method: string,
  headers: Headers,
  body: string,
  timeoutMs: number,
): Promise<{ raw: Buffer | undefined; error?: string }> {
  const payload = Buffer.from(body);
  const lines = [`${method} ${url.pathname}${url.search} HTTP/1.1`, `host: ${url.host}`, 'connection: close'];
  for (const [name, value] of headers) lines.push(`${name}: ${value}`);
  lines.push(`content-length: ${payload.length}`);
  const request = Buffer.concat([Buffer.from(`${lines.join('\r\n')}\r\n\r\n`), payload]);
  const port = Number(url.port || (url.protocol === 'https:' ? 443 : 80));
  const host = url.hostname.replace(/^\[|\]$/g, '');
  return new Promise((resolve) => {
    const socket: Socket =
      url.protocol === 'https:' ? tlsConnect({ host, port, servername: host }) : netConnect({ host, port });
    let done = false;
    const finish = (raw: Buffer | undefined, error?: string): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(error === undefined ? { raw } : { raw, error });
    };
    const timer = setTimeout(() => finish(undefined), timeoutMs);
    socket.once(url.protocol === 'https:' ? 'secureConnect' : 'connect', () => socket.write(request));
    // The first chunk of a small answer holds all of it: enough to name the resource.
    socket.once('data', (chunk: Buffer) => finish(chunk));
    socket.once('error', (error) => finish(undefined, error.message));
    socket.once('close', () => finish(undefined, 'the server closed the connection without answering'));
  });
}

/** Status and resource id of a raw HTTP/1.1 answer (best effort: the body may be cut or chunked). */
function parseRawAnswer(raw: Buffer, idField: string): { status: number; id: string | undefined } | undefined {
  const text = raw.toString('utf8');
  const match = /^HTTP\/1\.[01] (\d{3})/.exec(text);
  if (!match) return undefined;
  const split = text.indexOf('\r\n\r\n');
  const head = split < 0 ? text : text.slice(0, split);
  let body = split < 0 ? '' : text.slice(split + 4);
  if (/\r\ntransfer-encoding: *chunked/i.test(head)) body = dechunk(body);
  const location = /\r\nlocation: *([^\r\n]*)/i.exec(head)?.[1]?.trim();
  return { status: Number(match[1]), id: resourceId(body, location, idField) };
}

function dechunk(body: string): string {
  let out = '';
  let rest = body;
  for (;;) {
    const eol = rest.indexOf('\r\n');
    if (eol < 0) return out;
    const size = Number.parseInt(rest.slice(0, eol), 16);
    if (!(size > 0)) return out;
    out += rest.slice(eol + 2, eol + 2 + size);
    rest = rest.slice(eol + 2 + size + 2);
  }
}

/** The id at `path` (dotted) in a JSON body, else the Location header. */
function resourceId(text: string, location: string | undefined, path: string): string | undefined {
  try {
    let value: unknown = JSON.parse(text);
    for (const part of path.split('.')) {
      value = value !== null && typeof value === 'object' ? (value as Record<string, unknown>)[part] : undefined;
    }
    if (typeof value === 'string' || typeof value === 'number') return String(value);
  } catch {
    // not JSON: fall back to Location
  }
  return location || undefined;
}

/** What stands for the resource of a success: its id, else a digest of the body. */
function identity(answer: Answer): string {
  return answer.id ?? `body sha256:${createHash('sha256').update(answer.text).digest('hex').slice(0, 12)}`;
}

function isProblem(answer: Answer): boolean {
  return (answer.headers.get('content-type') ?? '').toLowerCase().startsWith('application/problem+json');
}

function problemType(answer: Answer): string | undefined {
  if (!isProblem(answer)) return undefined;
  try {
    const type = (JSON.parse(answer.text) as { type?: unknown }).type;
    return typeof type === 'string' ? type : undefined;
  } catch {
    return undefined;
  }
}

function isInFlight(answer: Answer): boolean {
  return problemType(answer)?.endsWith('/in-flight') ?? false;
}

/** One answer in a few words: `201 id=pay_1 replayed`, `400 problem key-missing`. */
function describe(answer: Answer): string {
  const parts = [String(answer.status)];
  const type = problemType(answer);
  if (type !== undefined) parts.push(`problem ${type.replace(/^https?:\/\/[^/]+\/(problems\/)?/, '')}`);
  else if (answer.status >= 400) parts.push(head(answer.text, 60));
  if (answer.status < 300 && answer.id !== undefined) parts.push(`id=${answer.id}`);
  if (answer.replayed) parts.push('replayed');
  return parts.filter((p) => p !== '').join(' ');
}

function head(text: string, max = 120): string {
  const flat = text.replace(/\s+/g, ' ').trim();
  return flat.length > max ? `${flat.slice(0, max - 1)}…` : flat;
}

function list(items: string[], max = 5): string {
  return items.length > max ? `${items.slice(0, max).join(', ')}, … (${items.length - max} more)` : items.join(', ');
}

function retryAfterMs(value: string | null): number {
  if (value === null) return 200;
  const seconds = Number(value);
  if (Number.isFinite(seconds) && seconds >= 0) return Math.min(seconds * 1000, MAX_SETTLE_WAIT_MS) || 50;
  const date = Date.parse(value);
  return Number.isNaN(date) ? 200 : Math.min(Math.max(date - Date.now(), 50), MAX_SETTLE_WAIT_MS);
}

function describeError(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = (error as { cause?: unknown }).cause;
  if (error.name === 'TimeoutError') return 'timed out';
  return cause instanceof Error ? `${error.message} (${cause.message})` : error.message;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
