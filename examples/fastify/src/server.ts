// A tiny payments API on Fastify 5, made idempotent by oncely.
//   npm run build && npm start
//   npx oncely verify http://127.0.0.1:3000/payments -H 'Authorization: Bearer acct_demo'
import { randomBytes } from 'node:crypto';
import Fastify from 'fastify';
import { oncely } from 'oncely/fastify';
import { memoryStore } from 'oncely/stores/memory';

// Declaration merging: `request.account` is typed wherever Fastify types the
// request, the `scope` function below included.
declare module 'fastify' {
  interface FastifyRequest {
    /** The caller's account, set by the onRequest hook. */
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

const app = Fastify();

// A stand-in for real authentication: the bearer token names the account.
app.addHook('onRequest', async (request, reply) => {
  const match = /^Bearer (\w+)$/.exec(request.headers.authorization ?? '');
  if (!match) return reply.code(401).send({ title: 'Authorization: Bearer <account> is required' });
  request.account = match[1];
});

await app.register(oncely, { store, scope: (request) => request.account });

app.post<{ Body: { amount: number; currency: string } }>(
  '/payments',
  {
    schema: {
      body: {
        type: 'object',
        required: ['amount', 'currency'],
        properties: { amount: { type: 'integer', minimum: 1 }, currency: { type: 'string', pattern: '^[A-Z]{3}$' } },
      },
    },
  },
  async (request, reply) => {
    await new Promise((resolve) => setTimeout(resolve, 20)); // the payment provider
    const payment: Payment = { id: `pay_${randomBytes(8).toString('hex')}`, account: request.account!, ...request.body };
    payments.set(payment.id, payment);
    return reply.code(201).header('location', `/payments/${payment.id}`).send(payment);
  },
);

app.get<{ Params: { id: string } }>('/payments/:id', async (request, reply) => {
  const payment = payments.get(request.params.id);
  if (payment === undefined || payment.account !== request.account) return reply.code(404).send({ title: 'no such payment' });
  return payment;
});

const url = await app.listen({ port: Number(process.env.PORT ?? 3000), host: process.env.HOST ?? '127.0.0.1' });
console.log(`listening on ${url}`);

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => void app.close().then(() => store.close()));
}
