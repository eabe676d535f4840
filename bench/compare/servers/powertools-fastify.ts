/**
 * @aws-lambda-powertools/idempotency on Fastify 5: `makeIdempotent` around
 * the payment function with the Redis `CachePersistenceLayer` (a connected
 * @redis/client v6 client, as its docs require). The idempotency key is the
 * JMESPath `[route, key]` of the event and a `responseHook` marks replays
 * (the docs' way to tell a replay from a first run). `VALIDATE=1` adds
 * `payloadValidationJmesPath: 'body'` (reject a reused key with another
 * body); in 2.35.0 the cache layer drops the payload hash when it stores the
 * result, so with it every replay fails validation (422): that variant only
 * runs the correctness rows. Outside Lambda there is no context, so a fixed
 * one gives in-progress records a 30 s lease (and silences the warning).
 */
import { IdempotencyConfig, makeIdempotent } from '@aws-lambda-powertools/idempotency';
import { CachePersistenceLayer } from '@aws-lambda-powertools/idempotency/cache';
import { createClient } from '@redis/client';
import Fastify from 'fastify';
import { countReport, pay, portFromEnv, ready } from '../../lib/payment.js';

const prefix = process.env.PREFIX ?? `cmp-${process.pid}`;
const client = createClient({ url: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', name: prefix });
await client.connect();
const persistenceStore = new CachePersistenceLayer({ client: client as never });

interface Event {
  key: string | undefined;
  route: string;
  body: unknown;
}
interface Answer {
  status: number;
  body: Record<string, unknown>;
  replayed?: boolean;
}

const config = new IdempotencyConfig({
  eventKeyJmesPath: '[route, key]',
  ...(process.env.VALIDATE === '1' ? { payloadValidationJmesPath: 'body' } : {}),
  throwOnNoIdempotencyKey: true,
  responseHook: (response) => ({ ...(response as Answer), replayed: true }),
});
config.registerLambdaContext({ getRemainingTimeInMillis: () => 30_000 } as never);

const processPayment = makeIdempotent(async (event: Event): Promise<Answer> => pay(event.route, event.key, event.body), {
  persistenceStore,
  keyPrefix: prefix,
  config,
});

const app = Fastify({ logger: false });
app.get('/__count', async (request) => countReport(request.url.split('?')[1]));
app.post('/payments*', async (request, reply) => {
  const key = request.headers['idempotency-key'];
  try {
    const answer = await processPayment({ key: typeof key === 'string' ? key : undefined, route: request.url.slice('/payments'.length), body: request.body });
    if (answer.replayed) reply.header('idempotent-replayed', 'true');
    return reply.code(answer.status).send(answer.body);
  } catch (error) {
    const name = (error as Error).name;
    if (name === 'IdempotencyAlreadyInProgressError') return reply.code(409).header('retry-after', '1').send({ error: (error as Error).message });
    if (name === 'IdempotencyValidationError') return reply.code(422).send({ error: (error as Error).message });
    if (name === 'IdempotencyKeyError') return reply.code(400).send({ error: (error as Error).message });
    throw error;
  }
});
await app.listen({ port: portFromEnv(), host: '127.0.0.1' });
ready((app.server.address() as { port: number }).port);
process.on('SIGTERM', () => void app.close().then(() => client.quit()).then(() => process.exit(0)));
