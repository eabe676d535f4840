/** Bare Fastify running the payment handler: the baseline. */
import Fastify from 'fastify';
import { countReport, pay, portFromEnv, ready } from '../lib/payment.js';

const app = Fastify({ logger: false });
app.get('/__count', async (request) => countReport(request.url.split('?')[1]));
app.post('/payments*', async (request, reply) => {
  const key = request.headers['idempotency-key'];
  const answer = await pay(request.url.slice('/payments'.length), typeof key === 'string' ? key : undefined, request.body);
  return reply.code(answer.status).send(answer.body);
});
await app.listen({ port: portFromEnv(), host: '127.0.0.1' });
ready((app.server.address() as { port: number }).port);
process.on('SIGTERM', () => void app.close().then(() => process.exit(0)));
