/**
 * Bare Fastify plus two empty hooks, the shape of any plugin that must act
 * before the handler and again before the answer goes out (a preHandler and
 * an onSend): the floor under oncely's figures on Fastify. `HOOKS=async`
 * (default: async functions, as oncely's), `HOOKS=callback`, or
 * `HOOKS=turn`: async, and the onSend waits one turn of the event loop
 * (`setImmediate`) as a plugin does that stores the answer before it sends
 * it (no store work at all: only the waiting).
 */
import Fastify from 'fastify';
import { countReport, pay, portFromEnv, ready } from '../lib/payment.js';

const app = Fastify({ logger: false });
if (process.env.HOOKS === 'callback') {
  app.addHook('preHandler', (_request, _reply, done) => done());
  app.addHook('onSend', (_request, _reply, payload, done) => done(null, payload));
} else if (process.env.HOOKS === 'turn') {
  app.addHook('preHandler', async () => {});
  app.addHook('onSend', async (_request, _reply, payload) => {
    await new Promise((resolve) => setImmediate(resolve));
    return payload;
  });
} else {
  app.addHook('preHandler', async () => {});
  // Awaits once, as a hook that stores something before the answer goes out.
  app.addHook('onSend', async (_request, _reply, payload) => {
    await Promise.resolve();
    return payload;
  });
}
app.get('/__count', async (request) => countReport(request.url.split('?')[1]));
app.post('/payments*', async (request, reply) => {
  const key = request.headers['idempotency-key'];
  const answer = await pay(request.url.slice('/payments'.length), typeof key === 'string' ? key : undefined, request.body);
  return reply.code(answer.status).send(answer.body);
});
await app.listen({ port: portFromEnv(), host: '127.0.0.1' });
ready((app.server.address() as { port: number }).port);
process.on('SIGTERM', () => void app.close().then(() => process.exit(0)));
