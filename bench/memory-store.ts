/**
 * The memory store in-process, at 1,000, 100,000 and 1,000,000 retained
 * records (issue 12): does the cost of a claim stay flat as the store fills,
 * and what does a record cost in memory?
 *
 * One child process per size (`node --expose-gc`), loading the compiled
 * store from `dist/` (`npm run build` first; `ONCELY_DIR=<checkout>` loads
 * another checkout's `dist/`, for before/after). In each:
 * 1. fill: `RETAINED` completed records, each with a 64-character id, a
 *    67-character fingerprint and a 200-byte response as the oncely HTTP
 *    front doors store it; then a full GC, and the heap and RSS they take;
 * 2. miss: `OPS` claims of new keys, each completed (claim + complete),
 *    with a clock that moves 1 ms per operation and a retention of 1 s, so
 *    that the store stays at its size (about 1,000 of these live at a
 *    time, the rest expire and are reclaimed in passing, as in production);
 * 3. replay: `OPS` claims of retained keys (completed: a replay).
 * CPU µs per operation is `process.cpuUsage()` over the loop (garbage
 * collection included, its helper threads too); ids, fingerprints and
 * outcomes are made before each round (and promoted by a full GC), so that
 * the loop pays for the store's own work and garbage.
 *
 *   npm run build && node --import tsx bench/memory-store.ts
 *   SIZES=1000,100000,1000000 OPS=200000 ROUNDS=3 ONCELY_DIR=/path/to/checkout
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { summarise, table } from './lib/load.js';
import { ROOT } from './lib/spawn.js';

const SIZES = (process.env.SIZES ?? '1000,100000,1000000').split(',').map(Number);
const OPS = Number(process.env.OPS ?? 200_000);
const ROUNDS = Number(process.env.ROUNDS ?? 3);
const DIR = process.env.ONCELY_DIR ?? ROOT;

interface Result {
  retained: number;
  fillUs: number;
  heapPerRecord: number;
  rssPerRecord: number;
  missUs: number[];
  replayUs: number[];
  gcMissMs: number[];
  size: number;
}

if (process.env.MEMORY_STORE_CHILD === undefined) {
  const rows: string[][] = [];
  for (const retained of SIZES) {
    const out = execFileSync(process.execPath, ['--expose-gc', '--import', 'tsx', fileURLToPath(import.meta.url)], {
      env: { ...process.env, MEMORY_STORE_CHILD: String(retained) },
      encoding: 'utf8',
      maxBuffer: 1 << 24,
      timeout: 600_000,
    });
    const r = JSON.parse(out.trim().split('\n').pop()!) as Result;
    const miss = summarise(r.missUs);
    const replay = summarise(r.replayUs);
    rows.push([
      r.retained.toLocaleString('en-US'),
      r.fillUs.toFixed(2),
      `${miss.median.toFixed(2)} (${miss.min.toFixed(2)}–${miss.max.toFixed(2)})`,
      `${Math.round(1e6 / miss.median).toLocaleString('en-US')}`,
      `${replay.median.toFixed(2)} (${replay.min.toFixed(2)}–${replay.max.toFixed(2)})`,
      summarise(r.gcMissMs).median.toFixed(0),
      ((r.heapPerRecord * 100_000) / 2 ** 20).toFixed(1),
      ((r.rssPerRecord * 100_000) / 2 ** 20).toFixed(1),
    ]);
    console.error(`retained ${r.retained}: done (store size at end ${r.size})`);
  }
  console.log(`memory store from ${DIR === ROOT ? 'this checkout' : DIR}: ${OPS} operations per round, ${ROUNDS} rounds (median and range)\n`);
  console.log(
    table(
      ['retained records', 'fill µs / (claim + complete)', 'miss µs / (claim + complete)', 'misses / s', 'replay µs / claim', 'GC pauses ms per miss round', 'heap + arrays MB / 100k records', 'RSS MB / 100k records'],
      rows,
    ),
  );
} else {
  const retained = Number(process.env.MEMORY_STORE_CHILD);
  const gc = (globalThis as { gc?: () => void }).gc!;
  const { memoryStore } = (await import(pathToFileURL(`${DIR}/dist/stores/memory.js`).href)) as typeof import('../src/stores/memory.js');
  const { PerformanceObserver, performance } = await import('node:perf_hooks');
  // GC pauses inside the timed loops only (entries arrive later, with their start time).
  const windows: Array<[number, number]> = [];
  let gcMs = 0;
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) if (windows.some(([a, b]) => e.startTime >= a && e.startTime <= b)) gcMs += e.duration;
  }).observe({ entryTypes: ['gc'] });

  let clock = 1_700_000_000_000;
  const store = memoryStore({ maxEntries: 10_000_000, maxBytes: 64 * 2 ** 30, now: () => clock });
  const hex = (tag: string, i: number) => createHash('sha256').update(`${tag}${i}`).digest('hex');
  // A 200-byte JSON response as the HTTP front doors store it (meta line, then the body).
  const outcome = (i: number) =>
    `${JSON.stringify({ k: 'r', s: 201, h: [['content-type', 'application/json; charset=utf-8']], e: 'u' })}\n${JSON.stringify({ id: `pay_${i}`, amount: 1250, currency: 'EUR', note: 'x'.repeat(200 - 48 - String(i).length) })}`;
  const LONG = { leaseMs: 30_000, ttlMs: 10 * 365 * 86_400_000 };
  const SHORT = { leaseMs: 1_000, ttlMs: 1_000 };
  const CHUNK = 10_000;

  // Made outside the timed loops: ids, fingerprints and outcomes of one chunk.
  const make = (tag: string, from: number, n: number) => {
    const ids: string[] = new Array(n);
    const fps: string[] = new Array(n);
    const outs: string[] = new Array(n);
    for (let i = 0; i < n; i++) {
      ids[i] = hex(tag, from + i);
      fps[i] = `v1:${hex(`f${tag}`, from + i)}`;
      outs[i] = outcome(from + i);
    }
    return { ids, fps, outs };
  };

  const fillIds: string[] = [];
  gc();
  const rss0 = process.memoryUsage().rss;
  const heap0 = process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers;
  let fillCpu = 0;
  for (let done = 0; done < retained; done += CHUNK) {
    const n = Math.min(CHUNK, retained - done);
    const { ids, fps, outs } = make('r', done, n);
    const t0 = process.cpuUsage();
    for (let i = 0; i < n; i++) {
      const claim = await store.claim(ids[i]!, { fingerprint: fps[i]!, ...LONG, scope: 'acct_bench' });
      if (claim.status !== 'acquired') throw new Error(`fill: ${claim.status}`);
      await store.complete(ids[i]!, claim.token, outs[i]!, LONG.ttlMs);
    }
    const t1 = process.cpuUsage(t0);
    fillCpu += t1.user + t1.system;
    // Keep a sample of the ids for the replay rounds (not all: they would count as the store's memory).
    for (let i = 0; i < n; i += Math.max(1, Math.floor(retained / 50_000))) fillIds.push(ids[i]!);
  }
  gc();
  await new Promise((resolve) => setTimeout(resolve, 500));
  gc();
  // Heap, plus typed arrays (outside the heap).
  const m = process.memoryUsage();
  const heapPerRecord = (m.heapUsed + m.arrayBuffers - heap0) / retained;
  const rssPerRecord = (m.rss - rss0) / retained;

  const missUs: number[] = [];
  const replayUs: number[] = [];
  const gcMissMs: number[] = [];
  let seq = 0;
  for (let round = 0; round < ROUNDS; round++) {
    let cpu = 0;
    await new Promise((resolve) => setTimeout(resolve, 20));
    const gc0 = gcMs;
    // This round's strings, made and promoted before the clock starts: the
    // loop then pays for the store's own work and garbage only.
    const chunks = [];
    for (let done = 0; done < OPS; done += CHUNK) {
      chunks.push(make('m', seq, CHUNK));
      seq += CHUNK;
    }
    gc();
    for (const { ids, fps, outs } of chunks) {
      const t0 = process.cpuUsage();
      const w0 = performance.now();
      for (let i = 0; i < CHUNK; i++) {
        clock += 1;
        const claim = await store.claim(ids[i]!, { fingerprint: fps[i]!, ...SHORT, scope: 'acct_bench' });
        if (claim.status !== 'acquired') throw new Error(`miss: ${claim.status}`);
        await store.complete(ids[i]!, claim.token, outs[i]!, SHORT.ttlMs);
      }
      const t1 = process.cpuUsage(t0);
      windows.push([w0, performance.now()]);
      cpu += t1.user + t1.system;
    }
    missUs.push(cpu / OPS);
    // GC entries arrive in a later task.
    await new Promise((resolve) => setTimeout(resolve, 20));
    gcMissMs.push(gcMs - gc0);
    const t0 = process.cpuUsage();
    for (let i = 0; i < OPS; i++) {
      const id = fillIds[i % fillIds.length]!;
      const claim = await store.claim(id, { fingerprint: null, ...LONG, scope: 'acct_bench' });
      if (claim.status !== 'completed') throw new Error(`replay: ${claim.status}`);
    }
    const t1 = process.cpuUsage(t0);
    replayUs.push((t1.user + t1.system) / OPS);
  }
  const result: Result = { retained, fillUs: fillCpu / retained, heapPerRecord, rssPerRecord, missUs, replayUs, gcMissMs, size: store.size };
  console.log(JSON.stringify(result));
}
