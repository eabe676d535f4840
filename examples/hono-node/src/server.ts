// A tiny payments API on Hono, served by Node (@hono/node-server), made
// idempotent by oncely's fetch front door.
//   npm run build && npm start
//   npx oncely verify http://127.0.0.1:3000/payments -H 'Authorization: Bearer acct_demo'
import { randomBytes } from 'node:crypto';
import { serve } from '@hono/node-server';
import { Hono } from 'hono';
import { withIdempotency } from 'oncely/fetch';
import { memoryStore } from 'oncely/stores/memory';

interface Payment {
  id: string;
  account: string;
  amount: number;
  currency: string;
}

/** A stand-in for real authentication: the bearer token names the account. */
function accountOf(request: Request): string | undefined {
  return /^Bearer (\w+)$/.exec(request.headers.get('authorization') ?? '')?.[1];
}

const payments = new Map<string, Payment>();
const store = memoryStore(); // one process; use the Redis, PostgreSQL, MySQL or SQLite store for several

const app = new Hono<{ Variables: { account: string } }>();

app.use(async (c, next) => {
  const account = accountOf(c.req.raw);
  if (account === undefined) return c.json({ title: 'Authorization: Bearer <account> is required' }, 401);
  c.set('account', account);
  await next();
});

app.post('/payments', async (c) => {
  const { amount, currency } = await c.req.json<{ amount?: unknown; currency?: unknown }>();
  if (!Number.isInteger(amount) || (amount as number) <= 0 || typeof currency !== 'string' || !/^[A-Z]{3}$/.test(currency)) {
    return c.json({ title: 'amount (a positive integer) and currency (ISO 4217) are required' }, 400);
  }
  await new Promise((resolve) => setTimeout(resolve, 20)); // the payment provider
  const payment: Payment = { id: `pay_${randomBytes(8).toString('hex')}`, account: c.get('account'), amount: amount as number, currency };
  payments.set(payment.id, payment);
  return c.json(payment, 201, { Location: `/payments/${payment.id}` });
});

app.get('/payments/:id', (c) => {
  const payment = payments.get(c.req.param('id'));
  if (payment === undefined || payment.account !== c.get('account')) return c.json({ title: 'no such payment' }, 404);
  return c.json(payment);
});

// oncely wraps the whole app: it answers duplicates before Hono routes them.
// The scope comes from the request itself, since Hono's middleware runs inside.
const server = serve(
  {
    fetch: withIdempotency(app.fetch, { store, scope: accountOf }),
    port: Number(process.env.PORT ?? 3000),
    hostname: process.env.HOST ?? '127.0.0.1',
  },
  (info) => console.log(`listening on http://${info.address}:${info.port}`),
);

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => server.close(() => void store.close()));
}
