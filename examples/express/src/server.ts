// A tiny payments API on Express 5, made idempotent by oncely.
//   npm run build && npm start
//   npx oncely verify http://127.0.0.1:3000/payments -H 'Authorization: Bearer acct_demo'
import { randomBytes } from 'node:crypto';
import express, { type NextFunction, type Request, type Response } from 'express';
import { idempotency } from 'oncely/express';
import { memoryStore } from 'oncely/stores/memory';

// Declaration merging: `req.account` is typed wherever Express types `req`,
// the `scope` function below included.
declare global {
  namespace Express {
    interface Request {
      /** The caller's account, set by `authenticate`. */
      account?: string;
    }
  }
}

interface Payment {
  id: string;
  account: string;
  amount: number;
  currency: string;
}

const payments = new Map<string, Payment>();
const store = memoryStore(); // one process; use the Redis, PostgreSQL, MySQL or SQLite store for several

/** A stand-in for real authentication: the bearer token names the account. */
function authenticate(req: Request, res: Response, next: NextFunction): void {
  const match = /^Bearer (\w+)$/.exec(req.get('authorization') ?? '');
  if (!match) {
    res.status(401).json({ title: 'Authorization: Bearer <account> is required' });
    return;
  }
  req.account = match[1];
  next();
}

const app = express();
app.use(express.json());
app.use(authenticate); // before oncely: the scope comes from it
app.use(idempotency({ store, scope: (req) => req.account }));

app.post('/payments', async (req, res) => {
  const { amount, currency } = (req.body ?? {}) as { amount?: unknown; currency?: unknown };
  if (!Number.isInteger(amount) || (amount as number) <= 0 || typeof currency !== 'string' || !/^[A-Z]{3}$/.test(currency)) {
    res.status(400).json({ title: 'amount (a positive integer) and currency (ISO 4217) are required' });
    return;
  }
  await new Promise((resolve) => setTimeout(resolve, 20)); // the payment provider
  const payment: Payment = { id: `pay_${randomBytes(8).toString('hex')}`, account: req.account!, amount: amount as number, currency };
  payments.set(payment.id, payment);
  res.status(201).location(`/payments/${payment.id}`).json(payment);
});

app.get('/payments/:id', (req, res) => {
  const payment = payments.get(req.params.id);
  if (payment === undefined || payment.account !== req.account) res.status(404).json({ title: 'no such payment' });
  else res.json(payment);
});

const server = app.listen(Number(process.env.PORT ?? 3000), process.env.HOST ?? '127.0.0.1', () => {
  const address = server.address();
  if (address !== null && typeof address === 'object') console.log(`listening on http://${address.address}:${address.port}`);
});

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    server.close(() => void store.close());
    server.closeIdleConnections();
  });
}
