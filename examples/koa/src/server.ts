// A tiny payments API on Koa 3, made idempotent by oncely.
//   npm run build && npm start
//   npx oncely verify http://127.0.0.1:3000/payments -H 'Authorization: Bearer acct_demo'
import { randomBytes } from 'node:crypto';
import Koa from 'koa';
import { idempotency } from 'oncely/koa';
import { memoryStore } from 'oncely/stores/memory';

// Declaration merging: `ctx.state.account` is typed wherever Koa types the
// context, the `scope` function below included.
declare module 'koa' {
  interface DefaultState {
    /** The caller's account, set by `authenticate`. */
    account?: string;
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
const authenticate: Koa.Middleware = async (ctx, next) => {
  const match = /^Bearer (\w+)$/.exec(ctx.get('authorization'));
  if (!match) {
    ctx.status = 401;
    ctx.body = { title: 'Authorization: Bearer <account> is required' };
    return;
  }
  ctx.state.account = match[1];
  await next();
};

const app = new Koa();
app.use(authenticate); // before oncely: the scope comes from it
app.use(idempotency({ store, scope: (ctx) => ctx.state.account }));

// Routes, by hand: Koa has no router of its own (@koa/router in a real app).
app.use(async (ctx) => {
  if (ctx.method === 'POST' && ctx.path === '/payments') {
    // No body parser: oncely read the body and left it parsed in ctx.request.body
    // (a parser such as @koa/bodyparser mounted before oncely works too).
    const { amount, currency } = ((ctx.request as { body?: unknown }).body ?? {}) as { amount?: unknown; currency?: unknown };
    if (!Number.isInteger(amount) || (amount as number) <= 0 || typeof currency !== 'string' || !/^[A-Z]{3}$/.test(currency)) {
      ctx.status = 400;
      ctx.body = { title: 'amount (a positive integer) and currency (ISO 4217) are required' };
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 20)); // the payment provider
    const payment: Payment = { id: `pay_${randomBytes(8).toString('hex')}`, account: ctx.state.account!, amount: amount as number, currency };
    payments.set(payment.id, payment);
    ctx.status = 201;
    ctx.set('Location', `/payments/${payment.id}`);
    ctx.body = payment;
    return;
  }
  const match = /^\/payments\/([^/]+)$/.exec(ctx.path);
  if (ctx.method === 'GET' && match) {
    const payment = payments.get(match[1]!);
    if (payment === undefined || payment.account !== ctx.state.account) {
      ctx.status = 404;
      ctx.body = { title: 'no such payment' };
    } else ctx.body = payment;
  }
  // Anything else: Koa's 404.
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
