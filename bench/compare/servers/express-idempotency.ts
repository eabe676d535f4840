/**
 * express-idempotency (VilledeMontreal) on Express 5, wired as its README says:
 * body parser first, then `idempotency({ dataAdapter })`; the handler returns
 * early on `isHit(req)` and calls `reportError(req)` when processing fails.
 * `STORE=memory` uses the built-in in-memory adapter, `STORE=redis` the
 * express-idempotency-redis-adapter (node-redis, client name = `PREFIX`).
 */
import express, { type NextFunction, type Request, type Response } from 'express';
import { getSharedIdempotencyService, idempotency } from 'express-idempotency';
import RedisAdapterModule from 'express-idempotency-redis-adapter';
import { countReport, pay, portFromEnv, ready } from '../../lib/payment.js';

const prefix = process.env.PREFIX ?? `cmp-${process.pid}`;
// The package is CommonJS with `exports.default`.
const RedisAdapter = (RedisAdapterModule as unknown as { default: typeof RedisAdapterModule }).default ?? RedisAdapterModule;
let adapter: InstanceType<typeof RedisAdapter> | undefined;
if (process.env.STORE === 'redis') {
  adapter = new RedisAdapter({ connectionConfig: { url: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', name: prefix } });
  await adapter.connect();
}

const app = express();
app.get('/__count', (req, res) => {
  res.json(countReport(req.url.split('?')[1]));
});
app.use(express.json());
app.use(idempotency(adapter ? { dataAdapter: adapter } : {}));
app.post(/^\/payments/, async (req, res) => {
  const service = getSharedIdempotencyService();
  if (service.isHit(req)) return;
  try {
    const answer = await pay(req.path.slice('/payments'.length), req.get('idempotency-key'), req.body);
    res.status(answer.status).json(answer.body);
  } catch (error) {
    // As the README says: tell the middleware that processing failed.
    await service.reportError(req);
    throw error;
  }
});
app.use((error: Error, _req: Request, res: Response, _next: NextFunction) => {
  // The middleware sets 409 (in progress) or 417 (misuse) before next(error).
  res.status(res.statusCode >= 400 ? res.statusCode : 500).json({ error: error.message });
});
const server = app.listen(portFromEnv(), '127.0.0.1', () => ready((server.address() as { port: number }).port));
process.on('SIGTERM', () => {
  server.close(() => void (adapter?.disconnect() ?? Promise.resolve()).then(() => process.exit(0)));
  server.closeAllConnections();
});
