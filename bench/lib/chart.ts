/**
 * The chart that opens docs/benchmarks.md: a grouped bar chart, hand-written
 * SVG (no chart library), of what each contestant adds to a bare server per
 * request, in µs of CPU: the server's own above the bare framework (solid),
 * plus the store's (lighter, stacked) where it is measured. One group per
 * store and path, oncely and the peers side by side.
 *
 * Two commands feed it (`npm run bench`: oncely on every store;
 * `npm run bench:compare`: oncely and the peers), so the figures travel in
 * the SVG itself (a `<metadata>` element): each command replaces its own
 * bars and keeps the other's.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './spawn.js';

export const CHART = join(ROOT, 'docs', 'benchmarks.svg');

export type ChartPath = 'miss' | 'replay';

/** One bar: a contestant on one store and path. */
export interface ChartEntry {
  /** Which command measured it. */
  source: 'http' | 'compare';
  /** Store label: memory, SQLite, Redis, PostgreSQL, MariaDB. */
  store: string;
  path: ChartPath;
  /** Library: oncely, or a peer's package name. */
  library: string;
  framework: 'Fastify' | 'Express';
  /** Server CPU µs per request above the bare framework (median of rounds). */
  server: number;
  /** The store's own CPU µs per request (median), when measured. */
  storeCpu?: number;
}

export interface ChartData {
  entries: ChartEntry[];
  /** What each command's run was: date, rounds, commit. */
  runs: Partial<Record<ChartEntry['source'], string>>;
}

const STORES = ['memory', 'SQLite', 'Redis', 'PostgreSQL', 'MariaDB'];
const PATHS: ChartPath[] = ['miss', 'replay'];
/** Aims of issue 12, server µs above bare Fastify. */
const AIMS: Record<string, Partial<Record<ChartPath, number>>> = { memory: { miss: 10, replay: 6 }, SQLite: { miss: 40, replay: 12 } };
const SERIES: Array<{ library: string; framework: 'Fastify' | 'Express'; color: string; label: string }> = [
  { library: 'oncely', framework: 'Fastify', color: '#1f4e9c', label: 'oncely, Fastify' },
  { library: 'oncely', framework: 'Express', color: '#6c9fe0', label: 'oncely, Express' },
  { library: '@node-idempotency/core', framework: 'Fastify', color: '#c8661b', label: '@node-idempotency/core, Fastify' },
  { library: '@node-idempotency/core', framework: 'Express', color: '#f0ae6e', label: '@node-idempotency/core, Express' },
  { library: '@aws-lambda-powertools/idempotency', framework: 'Fastify', color: '#2f8f4e', label: 'Powertools, Fastify' },
  { library: 'express-idempotency', framework: 'Express', color: '#8a55a6', label: 'express-idempotency, Express' },
];

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** The figures in the current SVG (none when it is missing or unreadable). */
export function readChart(file = CHART): ChartData {
  if (!existsSync(file)) return { entries: [], runs: {} };
  const m = /<metadata id="bench-data"><!\[CDATA\[([\s\S]*?)\]\]><\/metadata>/.exec(readFileSync(file, 'utf8'));
  if (!m) return { entries: [], runs: {} };
  try {
    return JSON.parse(m[1]!) as ChartData;
  } catch {
    return { entries: [], runs: {} };
  }
}

/** Replace one command's bars (same store, path, library, framework) and write the SVG again. */
export function updateChart(source: ChartEntry['source'], entries: ChartEntry[], run: string, file = CHART): void {
  const data = readChart(file);
  const key = (e: ChartEntry) => `${e.store}|${e.path}|${e.library}|${e.framework}`;
  const fresh = new Set(entries.map(key));
  data.entries = [...data.entries.filter((e) => !fresh.has(key(e))), ...entries];
  data.runs[source] = run;
  writeFileSync(file, renderChart(data));
}

/** A round axis maximum. */
function niceMax(v: number): number {
  const steps = [10, 20, 25, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400, 500];
  return steps.find((s) => s >= v) ?? Math.ceil(v / 100) * 100;
}

/** The SVG for `data`. */
export function renderChart(data: ChartData): string {
  const seriesOf = (e: ChartEntry) => SERIES.findIndex((s) => s.library === e.library && s.framework === e.framework);
  const groups = STORES.flatMap((store) =>
    PATHS.map((path) => ({
      store,
      path,
      bars: data.entries
        .filter((e) => e.store === store && e.path === path && seriesOf(e) >= 0 && Number.isFinite(e.server))
        .sort((a, b) => seriesOf(a) - seriesOf(b)),
    })),
  ).filter((g) => g.bars.length > 0);
  const total = (e: ChartEntry) => Math.max(0, e.server) + (Number.isFinite(e.storeCpu) ? Math.max(0, e.storeCpu!) : 0);
  const oncelyMax = Math.max(10, ...data.entries.filter((e) => e.library === 'oncely').map(total));
  const allMax = Math.max(10, ...data.entries.map(total));
  // Peers far above oncely would flatten every other bar: the axis stops at
  // a round value above oncely's largest bar (and at 300 µs), and taller bars
  // are cut, with their value written on them.
  const yMax = niceMax(Math.min(allMax, Math.max(oncelyMax * 1.15, 60), 300));
  // Room below zero for bars under their bare framework (and their labels).
  const lowest = Math.min(0, ...data.entries.map((e) => e.server));
  const yMin = lowest < 0 ? -niceMax(-lowest * 1.4 + 8) : 0;
  const barW = 18;
  const gap = 3;
  const groupPad = 22;
  const left = 56;
  const top = 96;
  const plotH = 300;
  const groupW = (n: number) => n * barW + (n - 1) * gap;
  const plotW = groups.reduce((w, g) => w + groupW(g.bars.length) + groupPad, groupPad);
  const width = Math.max(760, left + plotW + 20);
  const legendRows = Math.ceil(SERIES.length / 3);
  const height = top + plotH + 58 + legendRows * 20 + 40;
  const y = (v: number) => top + ((yMax - Math.max(yMin, Math.min(yMax, v))) / (yMax - yMin)) * plotH;
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif" font-size="12">`,
    `<metadata id="bench-data"><![CDATA[${JSON.stringify(data)}]]></metadata>`,
    '<defs><pattern id="hatch" width="5" height="5" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="5" height="5" fill="white" fill-opacity="0.45"/><line x1="0" y1="0" x2="0" y2="5" stroke="white" stroke-width="2"/></pattern></defs>',
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${left}" y="24" font-size="16" font-weight="600">CPU µs an idempotency layer adds to a bare server, per request (lower is better)</text>`,
    `<text x="${left}" y="44" fill="#444">Solid: server CPU above bare Fastify or bare Express, measured side by side (median of rounds).</text>`,
    `<text x="${left}" y="60" fill="#444">Hatched: the store's own CPU (Redis, PostgreSQL, MariaDB). Dashed red: oncely's aim on Fastify.</text>`,
    `<text x="${left}" y="76" fill="#444">miss: a new Idempotency-Key per request; replay: the same key again. Bars past the top are cut; their value is written.</text>`,
  );
  // Grid and axis.
  const span = yMax - yMin;
  const step = [5, 10, 20, 25, 50, 100].find((s) => span / s <= 8) ?? 100;
  for (let v = Math.ceil(yMin / step) * step; v <= yMax; v += step) {
    out.push(
      `<line x1="${left}" x2="${left + plotW}" y1="${y(v).toFixed(1)}" y2="${y(v).toFixed(1)}" stroke="${v === 0 ? '#333' : '#e3e3e3'}" stroke-width="${v === 0 ? 1.2 : 1}"/>`,
      `<text x="${left - 6}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end" fill="#555">${v}</text>`,
    );
  }
  out.push(`<text x="14" y="${top + plotH / 2}" transform="rotate(-90 14 ${top + plotH / 2})" text-anchor="middle" fill="#555">µs per request above bare</text>`);
  let x = left + groupPad;
  let lastStore = '';
  for (const g of groups) {
    const w = groupW(g.bars.length);
    if (g.store !== lastStore && lastStore !== '') {
      out.push(`<line x1="${x - groupPad / 2}" x2="${x - groupPad / 2}" y1="${top}" y2="${top + plotH + 40}" stroke="#ccc" stroke-dasharray="2 3"/>`);
    }
    g.bars.forEach((e, i) => {
      const bx = x + i * (barW + gap);
      const color = SERIES[seriesOf(e)]!.color;
      const server = e.server;
      const sc = Number.isFinite(e.storeCpu) ? Math.max(0, e.storeCpu!) : 0;
      const base = Math.max(0, server);
      const title = `${SERIES[seriesOf(e)]!.label}, ${g.store}, ${g.path}: server ${server >= 0 ? '+' : ''}${server.toFixed(1)} µs${sc > 0 ? `, store ${sc.toFixed(1)} µs` : ''}`;
      out.push(`<g><title>${esc(title)}</title>`);
      // Server part, from 0 (down when below bare).
      const y0 = y(0);
      const y1 = y(server);
      out.push(`<rect x="${bx}" y="${Math.min(y0, y1).toFixed(1)}" width="${barW}" height="${Math.max(0.8, Math.abs(y1 - y0)).toFixed(1)}" fill="${color}"/>`);
      if (sc > 0) {
        const ys = y(base + sc);
        const yb = y(base);
        out.push(
          `<rect x="${bx}" y="${ys.toFixed(1)}" width="${barW}" height="${Math.max(0, yb - ys).toFixed(1)}" fill="${color}"/>`,
          `<rect x="${bx}" y="${ys.toFixed(1)}" width="${barW}" height="${Math.max(0, yb - ys).toFixed(1)}" fill="url(#hatch)"/>`,
        );
      }
      const sum = base + sc;
      const cut = sum > yMax;
      if (cut) {
        // A break mark near the top: the bar goes on.
        out.push(`<path d="M${bx - 2} ${top + 14} l${barW + 4} -6 M${bx - 2} ${top + 19} l${barW + 4} -6" stroke="white" stroke-width="3"/>`);
      }
      const label = Math.round(sc) > 0 ? `${Math.round(server)}+${Math.round(sc)}` : `${Math.round(server)}`;
      if (cut) {
        // Written down the bar, in white, below the break.
        const lx = bx + barW / 2 + 3.5;
        const ly = top + 24;
        out.push(`<text x="${lx}" y="${ly}" transform="rotate(90 ${lx} ${ly})" font-size="10" font-weight="600" fill="white">${label}</text>`);
      } else {
        const ly = server < 0 && sc === 0 ? y(server) + 11 : y(sum) - 4;
        out.push(`<text x="${bx + barW / 2}" y="${ly.toFixed(1)}" text-anchor="middle" font-size="${label.length > 4 ? 8 : 9.5}" fill="#222">${label.replace('-', '−')}</text>`);
      }
      out.push('</g>');
    });
    const aim = g.bars.some((e) => e.library === 'oncely') ? AIMS[g.store]?.[g.path] : undefined;
    if (aim !== undefined) {
      out.push(
        `<line x1="${x - 4}" x2="${x + w + 4}" y1="${y(aim).toFixed(1)}" y2="${y(aim).toFixed(1)}" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="4 3"/>`,
      );
    }
    out.push(`<text x="${x + w / 2}" y="${top + plotH + 16}" text-anchor="middle" fill="#333">${g.path}</text>`);
    if (g.path === 'miss' || g.store !== lastStore) {
      const pair = groups.filter((h) => h.store === g.store);
      const pairW = pair.reduce((s, h) => s + groupW(h.bars.length), 0) + (pair.length - 1) * groupPad;
      out.push(`<text x="${x + pairW / 2}" y="${top + plotH + 34}" text-anchor="middle" font-weight="600">${g.store}</text>`);
    }
    lastStore = g.store;
    x += w + groupPad;
  }
  // Legend.
  const ly0 = top + plotH + 58;
  SERIES.forEach((s, i) => {
    const lx = left + (i % 3) * 250;
    const ly = ly0 + Math.floor(i / 3) * 20;
    out.push(`<rect x="${lx}" y="${ly - 10}" width="12" height="12" fill="${s.color}"/>`, `<text x="${lx + 18}" y="${ly}">${esc(s.label)}</text>`);
  });
  const runs = Object.entries(data.runs)
    .map(([k, v]) => `${k === 'http' ? 'npm run bench' : 'npm run bench:compare'}: ${v}`)
    .join('; ');
  out.push(`<text x="${left}" y="${height - 14}" fill="#666" font-size="10.5">${esc(runs)}</text>`, '</svg>', '');
  return out.join('\n');
}
