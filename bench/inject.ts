/**
 * What oncely adds per request, without sockets: Fastify's `inject` drives
 * bare Fastify and oncely on Fastify (memory store) with the same payment
 * handler, 50 requests in flight at a time. Each contestant runs in its own
 * child process (its own heap, so each pays its own garbage collection) and
 * reports its CPU time per request (`process.cpuUsage()`); rounds alternate
 * between them, and "above bare" is taken round by round. No kernel and no
 * load generator in the figures: steadier than the HTTP benchmark's for
 * trying a change to the hot path; `npm run bench` has the final say.
 *
 *   npm run build && node --import tsx bench/inject.ts
 * Other work on the machine inflates CPU time per request too (caches,
 * shared cores), so rounds are short and many, and the lowest round of each
 * contestant is shown beside the medians.
 *
 *   N=5000 ROUNDS=20 ONCELY_DIR=<checkout>[,<checkout>…] (each with its own dist/; default: this one)
 */
import { type ChildProcess, fork } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { BODY, summarise } from './lib/load.js';
import { ROOT } from './lib/spawn.js';

const N = Number(process.env.N ?? 5_000);
const ROUNDS = Number(process.env.ROUNDS ?? 20);
const INFLIGHT = 50;
const DIRS = (process.env.ONCELY_DIR ?? ROOT).split(',');

type Path = 'miss' | 'replay';

if (process.env.INJECT_CHILD === undefined) {
  const names = ['bare', ...DIRS.map((d, i) => `oncely ${i + 1} (${d === ROOT ? 'this checkout' : d})`)];
  const children: ChildProcess[] = names.map((_, i) =>
    fork(fileURLToPath(import.meta.url), [], {
      env: { ...process.env, INJECT_CHILD: i === 0 ? '' : DIRS[i - 1] },
      execArgv: ['--import', 'tsx'],
    }),
  );
  process.once('exit', () => {
    for (const c of children) c.kill('SIGKILL');
  });
  const ask = async (child: ChildProcess, path: Path, n: number): Promise<number> => {
    child.send({ path, n });
    const [answer] = (await once(child, 'message')) as [number];
    return answer;
  };
  for (const c of children) {
    await ask(c, 'replay', 5_000);
    await ask(c, 'miss', 5_000);
  }
  for (const path of ['miss', 'replay'] as Path[]) {
    const cpu = names.map(() => [] as number[]);
    for (let r = 0; r < ROUNDS; r++) {
      for (let j = 0; j < children.length; j++) {
        const k = (j + r) % children.length;
        cpu[k]!.push(await ask(children[k]!, path, N));
      }
    }
    names.forEach((name, k) => {
      const s = summarise(cpu[k]!);
      const added = summarise(cpu[k]!.map((v, i) => v - cpu[0]![i]!));
      const low = s.min - summarise(cpu[0]!).min;
      console.log(
        `${path.padEnd(6)} ${name.padEnd(44)} ${s.median.toFixed(1).padStart(6)} µs/request (lowest ${s.min.toFixed(1)})${k === 0 ? '' : `, above bare: median ${added.median.toFixed(1)} (${added.min.toFixed(1)}…${added.max.toFixed(1)}), lowest against lowest ${low.toFixed(1)}`}`,
      );
    });
  }
  for (const c of children) c.kill('SIGTERM');
} else {
  const dir = process.env.INJECT_CHILD;
  const { default: Fastify } = await import('fastify');
  const { pay } = await import('./lib/payment.js');
  const app = Fastify({ logger: false });
  if (dir !== '') {
    const { oncely } = (await import(pathToFileURL(`${dir}/dist/fastify/index.js`).href)) as typeof import('../src/fastify/index.js');
    const { memoryStore } = (await import(pathToFileURL(`${dir}/dist/stores/memory.js`).href)) as typeof import('../src/stores/memory.js');
    await app.register(oncely, {
      store: memoryStore({ maxEntries: 10_000_000, maxBytes: 2 ** 34 }),
      scope: (r) => r.headers['x-account'] as string | undefined,
    });
  }
  app.post('/payments', async (request, reply) => {
    const key = request.headers['idempotency-key'];
    const answer = await pay('', typeof key === 'string' ? key : undefined, request.body);
    return reply.code(answer.status).send(answer.body);
  });
  await app.ready();
  let seq = 0;
  process.on('message', async ({ path, n }: { path: Path; n: number }) => {
    const t0 = process.cpuUsage();
    for (let done = 0; done < n; done += INFLIGHT) {
      const batch: Promise<{ statusCode: number }>[] = [];
      for (let i = 0; i < INFLIGHT; i++) {
        batch.push(
          app.inject({
            method: 'POST',
            url: '/payments',
            headers: { 'content-type': 'application/json', 'x-account': 'acct_bench', 'idempotency-key': path === 'miss' ? `k-${seq++}` : 'replay-key' },
            payload: BODY,
          }),
        );
      }
      for (const r of await Promise.all(batch)) if (r.statusCode !== 201) throw new Error(`status ${r.statusCode}`);
    }
    const t = process.cpuUsage(t0);
    process.send!((t.user + t.system) / n);
  });
  process.on('SIGTERM', () => process.exit(0));
}
