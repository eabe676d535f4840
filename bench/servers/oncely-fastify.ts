/** oncely on Fastify (`STORE=memory|sqlite|redis|postgres|mariadb`, `PREFIX` for Redis keys and SQL tables, `REDIS_PORT`), running the payment handler. */
import Fastify from 'fastify';
import { oncely } from 'oncely/fastify';
import { countReport, pay, portFromEnv, ready } from '../lib/payment.js';
import { makeStore, type StoreKind } from '../lib/stores.js';

const bench = await makeStore((process.env.STORE ?? 'memory') as StoreKind, process.env.PREFIX ?? `oncely-bench-${process.pid}`);
const app = Fastify({ logger: false });
await app.register(oncely, {
  store: bench.store,
  scope: (request) => request.headers['x-account'] as string | undefined,
  // Retention (experiments): TTL_MS, e.g. 1000, keeps the memory store small.
  ...(process.env.TTL_MS ? { ttlMs: Number(process.env.TTL_MS), leaseMs: Math.min(30_000, Number(process.env.TTL_MS)) } : {}),
});
app.get('/__count', async (request) => countReport(request.url.split('?')[1], { store: bench.counts, backends: bench.backends?.() }));
app.post('/payments*', async (request, reply) => {
  const key = request.headers['idempotency-key'];
  const answer = await pay(request.url.slice('/payments'.length), typeof key === 'string' ? key : undefined, request.body);
  return reply.code(answer.status).send(answer.body);
});
await app.listen({ port: portFromEnv(), host: '127.0.0.1' });
ready((app.server.address() as { port: number }).port);
process.on('SIGTERM', () => void app.close().then(() => bench.cleanup()).then(() => process.exit(0)));
