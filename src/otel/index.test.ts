/**
 * oncely/otel with the OpenTelemetry SDK's in-memory exporters, over a real
 * Engine and the memory store: a run, a replay, a conflict, a mismatch, a
 * store failure, a takeover, the hooks form and the store wrapper.
 */
import { AggregationTemporality, InMemoryMetricExporter, MeterProvider, PeriodicExportingMetricReader } from '@opentelemetry/sdk-metrics';
import { BasicTracerProvider, InMemorySpanExporter, type ReadableSpan, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Engine } from '../engine/engine.js';
import type { IdempotencyStore } from '../engine/store.js';
import { memoryStore } from '../stores/memory.js';
import { instrument, instrumentStore, METRIC_NAMES, otelAvailable, otelHooks, SPAN_NAME } from './index.js';

interface Point {
  attributes: Record<string, unknown>;
  value: unknown;
}

let metricExporter: InMemoryMetricExporter;
let reader: PeriodicExportingMetricReader;
let meterProvider: MeterProvider;
let spanExporter: InMemorySpanExporter;
let tracerProvider: BasicTracerProvider;

beforeEach(() => {
  metricExporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
  // A long interval: the test exports when it wants, with forceFlush.
  reader = new PeriodicExportingMetricReader({ exporter: metricExporter, exportIntervalMillis: 60_000 });
  meterProvider = new MeterProvider({ readers: [reader] });
  spanExporter = new InMemorySpanExporter();
  tracerProvider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spanExporter)] });
});

afterEach(async () => {
  await meterProvider.shutdown();
  await tracerProvider.shutdown();
});

/** The points of one metric at the last export, [] when it has none. */
async function points(name: string): Promise<Point[]> {
  metricExporter.reset();
  await reader.forceFlush();
  const exported = metricExporter.getMetrics().at(-1);
  const metric = exported?.scopeMetrics.flatMap((scope) => scope.metrics).find((m) => m.descriptor.name === name);
  return (metric?.dataPoints ?? []).map((p) => ({ attributes: p.attributes as Record<string, unknown>, value: p.value }));
}

/** The sum of a counter's points whose attributes include `where`. */
async function sum(name: string, where: Record<string, unknown> = {}): Promise<number> {
  return (await points(name))
    .filter((p) => Object.entries(where).every(([k, v]) => p.attributes[k] === v))
    .reduce((total, p) => total + (p.value as number), 0);
}

function spans(): ReadableSpan[] {
  return spanExporter.getFinishedSpans().filter((s) => s.name === SPAN_NAME);
}

function spansOf(outcome: string): ReadableSpan[] {
  return spans().filter((s) => s.attributes['oncely.outcome'] === outcome);
}

/** Run one operation to completion under `id`. */
async function runOnce(engine: Engine, id: string, fingerprint: string | null = null): Promise<void> {
  const begun = await engine.begin({ id, fingerprint });
  if (begun.kind !== 'run') throw new Error(`expected run, got ${begun.kind}`);
  const performed = await begun.claim.perform({
    run: async () => ({ shipped: true }),
    settle: (value) => ({ kind: 'complete', outcome: JSON.stringify(value) }),
  });
  expect(performed.settled).toBe('stored');
}

describe('instrument(engine)', () => {
  it('finds @opentelemetry/api in this repository', () => {
    expect(otelAvailable()).toBe(true);
  });

  it('a run: a claim, one span from the claim to its settlement, the in-flight count back to zero', async () => {
    const engine = new Engine({ store: memoryStore() });
    const otel = instrument(engine, { meterProvider, tracerProvider });
    const begun = await engine.begin({ id: 'op-run', fingerprint: 'fp' });
    if (begun.kind !== 'run') throw new Error(begun.kind);
    expect(await sum(METRIC_NAMES.inFlight)).toBe(1);
    expect(spans()).toHaveLength(0); // still open
    await begun.claim.complete('{"ok":true}');

    expect(await sum(METRIC_NAMES.claims, { 'oncely.takeover': false, 'oncely.store': 'memory' })).toBe(1);
    expect(await sum(METRIC_NAMES.inFlight)).toBe(0);
    expect(await sum(METRIC_NAMES.settlements, { 'oncely.settled': 'stored' })).toBe(1);
    const [span] = spansOf('run');
    expect(span!.attributes).toMatchObject({
      'oncely.record_id': 'op-run',
      'oncely.outcome': 'run',
      'oncely.takeover': false,
      'oncely.settled': 'stored',
      'oncely.outcome_bytes': 11,
      'oncely.store': 'memory',
    });
    expect(span!.status.code).toBe(0); // unset: a success
    otel.dispose();
  });

  it('a replay, a conflict (in flight) and a mismatch: counted, each an instant span', async () => {
    const engine = new Engine({ store: memoryStore() });
    const otel = instrument(engine, { meterProvider, tracerProvider });
    await runOnce(engine, 'op-replay', 'fp-1');
    expect((await engine.begin({ id: 'op-replay', fingerprint: 'fp-1' })).kind).toBe('replay');
    expect((await engine.begin({ id: 'op-replay', fingerprint: 'fp-2' })).kind).toBe('mismatch');

    const running = await engine.begin({ id: 'op-busy', fingerprint: null });
    expect(running.kind).toBe('run');
    expect((await engine.begin({ id: 'op-busy', fingerprint: null })).kind).toBe('in_flight');

    expect(await sum(METRIC_NAMES.replays)).toBe(1);
    expect(await sum(METRIC_NAMES.mismatches)).toBe(1);
    expect(await sum(METRIC_NAMES.conflicts)).toBe(1);
    expect(await sum(METRIC_NAMES.inFlight)).toBe(1); // op-busy runs
    expect(spansOf('replay').map((s) => s.attributes['oncely.record_id'])).toEqual(['op-replay']);
    expect(spansOf('mismatch').map((s) => s.attributes['oncely.record_id'])).toEqual(['op-replay']);
    const [inFlight] = spansOf('in_flight');
    expect(inFlight!.attributes['oncely.record_id']).toBe('op-busy');
    expect(typeof inFlight!.attributes['oncely.lease_until']).toBe('number');

    if (running.kind === 'run') await running.claim.release('test over');
    expect(await sum(METRIC_NAMES.inFlight)).toBe(0);
    expect(spansOf('run').find((s) => s.attributes['oncely.record_id'] === 'op-busy')!.attributes).toMatchObject({
      'oncely.settled': 'released',
      'oncely.release_reason': 'test over',
    });
    otel.dispose();
  });

  it('a store failure: the store error counted, an unavailable span with an error status, its latency timed', async () => {
    const base = memoryStore();
    let down = false;
    const flaky: IdempotencyStore = {
      ...base,
      name: 'flaky',
      claim: (id, input) => (down ? Promise.reject(Object.assign(new Error('connection refused'), { code: 'ECONNREFUSED' })) : base.claim(id, input)),
    };
    const engine = new Engine({ store: instrumentStore(flaky, { meterProvider }) });
    const otel = instrument(engine, { meterProvider, tracerProvider });
    await runOnce(engine, 'op-ok');
    down = true;
    const begun = await engine.begin({ id: 'op-down', fingerprint: null });
    expect(begun.kind).toBe('unavailable');

    expect(await sum(METRIC_NAMES.storeErrors, { 'oncely.store.operation': 'claim', 'error.type': 'ECONNREFUSED' })).toBe(1);
    const [span] = spansOf('unavailable');
    expect(span!.attributes).toMatchObject({ 'oncely.record_id': 'op-down', 'error.type': 'ECONNREFUSED', 'oncely.store': 'flaky' });
    expect(span!.status).toMatchObject({ code: 2, message: 'connection refused' });

    const durations = await points(METRIC_NAMES.storeDuration);
    const count = (operation: string, error?: string) =>
      durations
        .filter((p) => p.attributes['oncely.store.operation'] === operation && p.attributes['error.type'] === error)
        .reduce((n, p) => n + (p.value as { count: number }).count, 0);
    expect(count('claim')).toBe(1);
    expect(count('claim', 'ECONNREFUSED')).toBe(1);
    expect(count('complete')).toBe(1);
    expect(durations.every((p) => p.attributes['oncely.store'] === 'flaky')).toBe(true);
    otel.dispose();
  });

  it('a takeover in this process: the earlier claim ends taken_over, its fenced write lands on the new span as an event', async () => {
    let now = Date.now();
    const engine = new Engine({ store: memoryStore({ now: () => now }), leaseMs: 30_000 });
    const otel = instrument(engine, { meterProvider, tracerProvider });
    const first = await engine.begin({ id: 'op-crash', fingerprint: 'fp' });
    if (first.kind !== 'run') throw new Error(first.kind);
    now += 31_000; // the first owner's lease ran out (it hung)
    const second = await engine.begin({ id: 'op-crash', fingerprint: 'fp' });
    if (second.kind !== 'run') throw new Error(second.kind);
    expect(second.claim.takeover).toBe(true);
    expect(await sum(METRIC_NAMES.inFlight)).toBe(1);

    expect(await first.claim.complete('{"late":true}')).toBe(false); // fenced
    expect(await second.claim.complete('{"ok":true}')).toBe(true);

    expect(await sum(METRIC_NAMES.takeovers)).toBe(1);
    expect(await sum(METRIC_NAMES.claims, { 'oncely.takeover': true })).toBe(1);
    expect(await sum(METRIC_NAMES.claims, { 'oncely.takeover': false })).toBe(1);
    expect(await sum(METRIC_NAMES.inFlight)).toBe(0);
    expect(await sum(METRIC_NAMES.settlements, { 'oncely.settled': 'fenced' })).toBe(1);
    const runs = spansOf('run');
    expect(runs.map((s) => [s.attributes['oncely.takeover'], s.attributes['oncely.settled']])).toEqual([
      [false, 'taken_over'],
      [true, 'stored'],
    ]);
    expect(runs[0]!.status.code).toBe(2);
    // The late write and the lease loss it revealed are the earlier owner's: events, not this span's outcome.
    expect(runs[1]!.events.map((e) => e.name)).toEqual(['oncely.earlier_owner_fenced', 'oncely.earlier_owner_lease_lost']);
    expect(runs[1]!.attributes['oncely.lease_lost']).toBeUndefined();
    expect(runs[1]!.status.code).toBe(0);
    expect(await sum(METRIC_NAMES.leasesLost)).toBe(1);
    otel.dispose();
  });

  it('a fenced completion of the only owner ends its span fenced, with an error status', async () => {
    const store = memoryStore();
    const engine = new Engine({ store });
    const otel = instrument(engine, { meterProvider, tracerProvider });
    const begun = await engine.begin({ id: 'op-fenced', fingerprint: null });
    if (begun.kind !== 'run') throw new Error(begun.kind);
    await store.delete('op-fenced'); // an administrator removed the record: the token owns nothing
    expect(await begun.claim.settle({ kind: 'complete', outcome: '{}' })).toBe('fenced');
    const [span] = spansOf('run');
    expect(span!.attributes).toMatchObject({ 'oncely.settled': 'fenced', 'oncely.fenced_operation': 'complete' });
    expect(span!.status.code).toBe(2);
    expect(await sum(METRIC_NAMES.inFlight)).toBe(0);
    otel.dispose();
  });

  it('a lease lost while running (abandoned, no renewals): marked on the span, which still ends with its settlement', async () => {
    const engine = new Engine({ store: memoryStore(), leaseMs: 60 });
    const otel = instrument(engine, { meterProvider, tracerProvider });
    const begun = await engine.begin({ id: 'op-lost', fingerprint: null });
    if (begun.kind !== 'run') throw new Error(begun.kind);
    begun.claim.abandon(); // its request went away: no more renewals
    // The signal fires at the lease deadline (bounded, for a loaded machine).
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the lease never ran out')), 5_000);
      begun.claim.signal.addEventListener('abort', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    // Nobody took the record over, so the memory store still takes the late completion.
    const settled = await begun.claim.settle({ kind: 'complete', outcome: '{}' });
    const [span] = spansOf('run');
    expect(span!.attributes).toMatchObject({ 'oncely.lease_lost': true, 'oncely.settled': settled });
    expect(span!.events.map((e) => e.name)).toContain('oncely.lease_lost');
    expect(await sum(METRIC_NAMES.leasesLost)).toBe(1);
    otel.dispose();
  });

  it('dispose: stops listening, claims still open end as unobserved', async () => {
    const engine = new Engine({ store: memoryStore() });
    const otel = instrument(engine, { meterProvider, tracerProvider });
    const begun = await engine.begin({ id: 'op-open', fingerprint: null });
    otel.dispose();
    otel.dispose(); // twice is harmless
    expect(await sum(METRIC_NAMES.inFlight)).toBe(0);
    expect(spansOf('run')[0]!.attributes['oncely.settled']).toBe('unobserved');
    if (begun.kind === 'run') await begun.claim.complete('{}');
    await runOnce(engine, 'op-after');
    expect(await sum(METRIC_NAMES.claims)).toBe(1);
    expect(spans()).toHaveLength(1);
  });

  it('spans: false keeps the metrics only', async () => {
    const engine = new Engine({ store: memoryStore() });
    const otel = instrument(engine, { meterProvider, tracerProvider, spans: false });
    await runOnce(engine, 'op-metrics-only');
    expect(await sum(METRIC_NAMES.claims)).toBe(1);
    expect(spans()).toHaveLength(0);
    otel.dispose();
  });
});

describe('otelHooks()', () => {
  it('passed as hooks: the same metrics and spans, without the engine at hand', async () => {
    const engine = new Engine({ store: memoryStore(), hooks: otelHooks({ meterProvider, tracerProvider, storeName: 'mem' }) });
    await runOnce(engine, 'op-hooks');
    expect((await engine.begin({ id: 'op-hooks', fingerprint: null })).kind).toBe('replay');
    expect(await sum(METRIC_NAMES.claims, { 'oncely.store': 'mem' })).toBe(1);
    expect(await sum(METRIC_NAMES.replays, { 'oncely.store': 'mem' })).toBe(1);
    expect(spans().map((s) => s.attributes['oncely.outcome'])).toEqual(['run', 'replay']);
  });
});

describe('instrumentStore(store)', () => {
  it('times every operation, passes answers and errors through unchanged', async () => {
    const base = memoryStore();
    const store = instrumentStore(base, { meterProvider });
    expect(store.name).toBe('memory');
    expect(store.capabilities).toBe(base.capabilities);
    const claimed = await store.claim('s1', { fingerprint: null, leaseMs: 1000, ttlMs: 10_000 });
    if (claimed.status !== 'acquired') throw new Error(claimed.status);
    expect(await store.renew('s1', claimed.token, 1000)).toBe(true);
    expect(await store.get('s1')).toMatchObject({ state: 'in_progress' });
    expect(await store.release('s1', 'not-the-token')).toBe(false);
    expect(await store.delete('s1')).toBe(true);
    const failing = instrumentStore({ ...base, get: () => Promise.reject(new TypeError('boom')) }, { meterProvider });
    await expect(failing.get('x')).rejects.toThrow('boom');
    const byOperation = Object.fromEntries(
      (await points(METRIC_NAMES.storeDuration)).map((p) => [
        `${p.attributes['oncely.store.operation']}${p.attributes['error.type'] ? `:${p.attributes['error.type']}` : ''}`,
        (p.value as { count: number }).count,
      ]),
    );
    expect(byOperation).toEqual({ claim: 1, renew: 1, get: 1, release: 1, delete: 1, 'get:TypeError': 1 });
  });
});
