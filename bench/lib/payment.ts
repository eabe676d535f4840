import { PerformanceObserver } from 'node:perf_hooks';

/**
 * The payment handler every contestant runs, and the execution counter the
 * harness reads. Framework-free so that each server is only its wiring.
 *
 * Routes (all POST, JSON body `{amount, currency}`):
 * - `/payments`            runs at once;
 * - `/payments/slow`       waits 50 ms first, so that concurrent duplicates overlap;
 * - `/payments/throw-once` throws on the first execution of a key, then succeeds;
 * - `/payments/500-once`   answers 500 on the first execution of a key, then 201.
 * Every execution is counted, in total and per `Idempotency-Key`.
 */

export interface PaymentAnswer {
  status: number;
  body: Record<string, unknown>;
}

let total = 0;
const perKey = new Map<string, number>();

// Garbage-collection pauses of this process so far (main thread, wall time), µs.
let gcUs = 0;
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) gcUs += entry.duration * 1000;
}).observe({ entryTypes: ['gc'] });

/** Slow route delay, ms. */
export const SLOW_MS = 50;

function validBody(body: unknown): { amount: number; currency: string } | null {
  if (typeof body !== 'object' || body === null) return null;
  const { amount, currency } = body as { amount?: unknown; currency?: unknown };
  if (typeof amount !== 'number' || typeof currency !== 'string') return null;
  return { amount, currency };
}

/** Run the handler for `route` (the path after `/payments`) and answer status and body. */
export async function pay(route: string, key: string | undefined, body: unknown): Promise<PaymentAnswer> {
  if (route === '/slow') await new Promise((resolve) => setTimeout(resolve, SLOW_MS));
  total += 1;
  const n = key === undefined ? 1 : (perKey.get(key) ?? 0) + 1;
  if (key !== undefined) perKey.set(key, n);
  if (route === '/throw-once' && n === 1) throw new Error('payment provider timed out');
  if (route === '/500-once' && n === 1) return { status: 500, body: { error: 'payment provider unavailable' } };
  const payment = validBody(body);
  if (payment === null) return { status: 400, body: { error: 'amount and currency required' } };
  return { status: 201, body: { id: `pay_${process.pid}_${total}`, amount: payment.amount, currency: payment.currency } };
}

/**
 * Answer of `GET /__count`: total executions, those of the keys asked for,
 * the CPU time this process has used (µs, user + system: a cost per request
 * that other load on the machine barely changes), its garbage-collection
 * pauses (µs), and any extra counters.
 */
export function countReport(query: string | undefined, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const keys: Record<string, number> = {};
  if (query) {
    const asked = new URLSearchParams(query).get('keys');
    if (asked) for (const k of asked.split(',')) keys[k] = perKey.get(k) ?? 0;
  }
  const cpu = process.cpuUsage();
  return { total, keys, cpuUs: cpu.user + cpu.system, gcUs, ...extra };
}

/** Print the port in the line the harness waits for. */
export function ready(port: number): void {
  process.stdout.write(`PORT=${port}\n`);
}

/** Port from the environment (0: any free port). */
export function portFromEnv(): number {
  return Number(process.env.PORT ?? 0);
}
