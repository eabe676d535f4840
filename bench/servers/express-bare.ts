/** Bare Express 5 running the payment handler: the Express baseline. */
import express, { type NextFunction, type Request, type Response } from 'express';
import { countReport, pay, portFromEnv, ready } from '../lib/payment.js';

const app = express();
app.get('/__count', (req, res) => {
  res.json(countReport(req.url.split('?')[1]));
});
app.post(/^\/payments/, express.json(), async (req, res) => {
  const answer = await pay(req.path.slice('/payments'.length), req.get('idempotency-key'), req.body);
  res.status(answer.status).json(answer.body);
});
app.use((error: Error, _req: Request, res: Response, _next: NextFunction) => {
  res.status(500).json({ error: error.message });
});
const server = app.listen(portFromEnv(), '127.0.0.1', () => ready((server.address() as { port: number }).port));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
