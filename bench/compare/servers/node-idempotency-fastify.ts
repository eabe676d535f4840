/** @node-idempotency/core (Redis adapter) on Fastify 5: see node-idempotency.ts for the wiring. */
import Fastify, { type FastifyRequest } from 'fastify';
import { countReport, pay, portFromEnv, ready } from '../../lib/payment.js';
import { makeIdempotency, type Params } from './node-idempotency.js';

const idem = await makeIdempotency(process.env.PREFIX ?? `cmp-${process.pid}`);
const kParams = Symbol('params');
type WithParams = FastifyRequest & { [kParams]?: Params };

const app = Fastify({ logger: false });
app.addHook('preHandler', async (request: WithParams, reply) => {
  if (request.method !== 'POST') return;
  const params: Params = { headers: request.headers, body: request.body as Record<string, unknown>, path: request.url, method: request.method };
  const begun = await idem.before(params);
  if (begun.kind === 'respond') return reply.code(begun.status).headers(begun.headers).send(begun.body);
  request[kParams] = params;
});
app.addHook('onSend', async (request: WithParams, reply, payload) => {
  const params = request[kParams];
  if (params === undefined) return payload;
  request[kParams] = undefined;
  const body = typeof payload === 'string' ? JSON.parse(payload) : payload;
  await idem.after(params, reply.statusCode, reply.getHeader('content-type') as string | undefined, body);
  return payload;
});
app.get('/__count', async (request) => countReport(request.url.split('?')[1]));
app.post('/payments*', async (request, reply) => {
  const key = request.headers['idempotency-key'];
  const answer = await pay(request.url.slice('/payments'.length), typeof key === 'string' ? key : undefined, request.body);
  return reply.code(answer.status).send(answer.body);
});
await app.listen({ port: portFromEnv(), host: '127.0.0.1' });
ready((app.server.address() as { port: number }).port);
process.on('SIGTERM', () => void app.close().then(() => idem.close()).then(() => process.exit(0)));
