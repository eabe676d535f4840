/** oncely on Express 5 (`STORE=memory|sqlite|redis|postgres|mariadb`, `PREFIX` for Redis keys and SQL tables, `REDIS_PORT`), running the payment handler. */
import express, { type NextFunction, type Request, type Response } from 'express';
import { idempotency } from 'oncely/express';
import { countReport, pay, portFromEnv, ready } from '../lib/payment.js';
import { makeStore, type StoreKind } from '../lib/stores.js';

const bench = await makeStore((process.env.STORE ?? 'memory') as StoreKind, process.env.PREFIX ?? `oncely-bench-${process.pid}`);
const app = express();
app.get('/__count', (req, res) => {
  res.json(countReport(req.url.split('?')[1], { store: bench.counts, backends: bench.backends?.() }));
});
app.use(idempotency({ store: bench.store, scope: (req) => req.get('x-account') }));
app.post(/^\/payments/, express.json(), async (req, res) => {
  const answer = await pay(req.path.slice('/payments'.length), req.get('idempotency-key'), req.body);
  res.status(answer.status).json(answer.body);
});
app.use((error: Error, _req: Request, res: Response, _next: NextFunction) => {
  res.status(500).json({ error: error.message });
});
const server = app.listen(portFromEnv(), '127.0.0.1', () => ready((server.address() as { port: number }).port));
process.on('SIGTERM', () => {
  server.close(() => void bench.cleanup().then(() => process.exit(0)));
  server.closeAllConnections();
});
