/** @node-idempotency/core (Redis adapter) on Express 5: see node-idempotency.ts for the wiring. */
import express, { type NextFunction, type Request, type Response } from 'express';
import { countReport, pay, portFromEnv, ready } from '../../lib/payment.js';
import { makeIdempotency, type Params } from './node-idempotency.js';

const idem = await makeIdempotency(process.env.PREFIX ?? `cmp-${process.pid}`);
const app = express();
app.get('/__count', (req, res) => {
  res.json(countReport(req.url.split('?')[1]));
});
app.use(express.json());
app.use(async (req: Request, res: Response, next: NextFunction) => {
  if (req.method !== 'POST') return next();
  const params: Params = { headers: req.headers, body: req.body, path: req.url, method: req.method };
  const begun = await idem.before(params);
  if (begun.kind === 'respond') {
    res.status(begun.status).set(begun.headers);
    res.json(begun.body);
    return;
  }
  // Store the answer before it is sent, as the NestJS interceptor does.
  const json = res.json.bind(res);
  res.json = (body: unknown) => {
    idem.after(params, res.statusCode, 'application/json; charset=utf-8', body).then(
      () => json(body),
      (error: unknown) => next(error),
    );
    return res;
  };
  next();
});
app.post(/^\/payments/, async (req, res) => {
  const answer = await pay(req.path.slice('/payments'.length), req.get('idempotency-key'), req.body);
  res.status(answer.status).json(answer.body);
});
app.use((error: Error, _req: Request, res: Response, _next: NextFunction) => {
  res.status(500).json({ error: error.message });
});
const server = app.listen(portFromEnv(), '127.0.0.1', () => ready((server.address() as { port: number }).port));
process.on('SIGTERM', () => {
  server.close(() => void idem.close().then(() => process.exit(0)));
  server.closeAllConnections();
});
