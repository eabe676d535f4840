/**
 * The rows of the HTTP lifecycle matrix: one payment app per front door and
 * setup users really have (a global body parser before oncely or after it,
 * per-route parsers, Fastify's hijacked and streamed replies, fetch plain
 * and on Hono). Every row runs the same handler plan, steered by the
 * `x-fault` request header (see {@link FAULTS}).
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { createAdaptorServer } from '@hono/node-server';
import express from 'express';
import express4 from 'express4';
import Fastify from 'fastify';
import { Hono } from 'hono';
import type { HttpIdempotencyOptions } from 'oncely';
import { idempotency } from 'oncely/express';
import { oncely } from 'oncely/fastify';
import { withIdempotency } from 'oncely/fetch';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The handler faults, one per matrix column that the handler itself causes. */
export const FAULTS = [
  'none',
  'throw-before',
  'throw-after',
  'unserialisable',
  'stream-error',
  'abort',
  'destroy',
  'never',
  'slow',
  'status-500',
] as const;
export type HandlerFault = (typeof FAULTS)[number];

/** Bytes of a streamed answer's first chunk: more than the rows' `maxStoredBytes`, so it really goes out. */
export const STREAM_CHUNK = 4096;
/** `maxStoredBytes` of every row. */
export const MAX_STORED = 1024;

/** How a row answers; each framework implements it its own way. */
interface Responder {
  json(status: number, body: unknown): unknown;
  /** Send the head and a first chunk, then fail the stream. */
  streamThenFail(status: number): unknown;
  /** Destroy the connection without answering. */
  destroy(): unknown;
}

/** The handler plan every row runs. `effect` counts executions that had their effect. */
async function plan(fault: HandlerFault, effect: () => number, r: Responder): Promise<unknown> {
  switch (fault) {
    case 'none':
      return r.json(201, { id: `pay_${effect()}` });
    case 'throw-before':
      throw new Error('failed before the effect');
    case 'throw-after':
      effect();
      throw new Error('failed after the effect');
    case 'unserialisable':
      effect();
      return r.json(201, { id: 'pay', amount: 10n });
    case 'stream-error':
      effect();
      return r.streamThenFail(200);
    case 'abort':
      // The client gives up at 100 ms; the handler finishes at 300 ms.
      await sleep(300);
      return r.json(201, { id: `pay_${effect()}` });
    case 'destroy':
      effect();
      return r.destroy();
    case 'never':
      return new Promise(() => {});
    case 'slow':
      await sleep(450);
      return r.json(201, { id: `pay_${effect()}` });
    case 'status-500':
      return r.json(500, { error: 'upstream down' });
  }
}

export interface RowApp {
  url: string;
  executions(): number;
  close(): Promise<void>;
}

export interface Row {
  name: string;
  /** Body encoding the row's parser expects. */
  form?: boolean;
  /** Columns that cannot happen in this row. */
  skip?: readonly string[];
  /** The row's answers cannot be stored (streamed or hijacked): a retry learns it completed instead of a replay. */
  unstorable?: boolean;
  start(options: HttpIdempotencyOptions<never>): Promise<RowApp>;
}

async function listen(server: Server): Promise<string> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

const closeServer = (server: Server) =>
  new Promise<void>((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  });

const faultOf = (value: unknown): HandlerFault => (typeof value === 'string' ? value : 'none') as HandlerFault;

type Parser = 'json' | 'urlencoded';
type Mount = 'before' | 'after' | 'route';

function expressRow(version: 4 | 5, parser: Parser, mount: Mount): Row {
  return {
    name: `express${version} ${parser} ${mount}`,
    form: parser === 'urlencoded',
    async start(options) {
      const factory = (version === 5 ? express : express4) as unknown as typeof express;
      const app = factory();
      const parse = parser === 'json' ? factory.json() : factory.urlencoded({ extended: false });
      let count = 0;
      if (mount === 'before') app.use(parse);
      app.use(idempotency(options as never));
      if (mount === 'after') app.use(parse);
      const handlers: express.RequestHandler[] = mount === 'route' ? [parse] : [];
      handlers.push(async (req, res, next) => {
        try {
          await plan(faultOf(req.get('x-fault')), () => ++count, {
            json: (status, body) => res.status(status).json(body),
            streamThenFail: (status) => {
              res.status(status).type('text/plain');
              res.write('x'.repeat(STREAM_CHUNK));
              setTimeout(() => next(new Error('stream failed')), 20);
            },
            destroy: () => req.socket.destroy(),
          });
        } catch (error) {
          next(error);
        }
      });
      app.post('/payments', ...handlers);
      app.use((_error: unknown, _req: express.Request, res: express.Response, next: express.NextFunction) => {
        if (res.headersSent) return next(_error);
        res.status(500).json({ error: 'boom' });
      });
      const server = createServer(app);
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    },
  };
}

type FastifyStyle = 'send' | 'hijack' | 'stream';

function fastifyRow(style: FastifyStyle): Row {
  return {
    name: `fastify ${style}`,
    unstorable: style !== 'send',
    async start(options) {
      const app = Fastify();
      await app.register(oncely, options as never);
      let count = 0;
      app.post('/payments', async (request, reply) => {
        return plan(faultOf(request.headers['x-fault']), () => ++count, {
          json: (status, body) => {
            if (style === 'send') return reply.code(status).send(body);
            const text = JSON.stringify(body);
            if (style === 'stream') return reply.code(status).type('application/json').send(Readable.from([text]));
            reply.hijack();
            reply.raw.writeHead(status, { 'content-type': 'application/json' });
            reply.raw.end(text);
            return reply;
          },
          streamThenFail: (status) => {
            if (style === 'hijack') {
              reply.hijack();
              reply.raw.writeHead(status, { 'content-type': 'text/plain' });
              reply.raw.write('x'.repeat(STREAM_CHUNK));
              setTimeout(() => reply.raw.destroy(new Error('stream failed')), 20);
              return reply;
            }
            const stream = new Readable({ read() {} });
            stream.push('x'.repeat(STREAM_CHUNK));
            setTimeout(() => stream.destroy(new Error('stream failed')), 20);
            return reply.code(status).type('text/plain').send(stream);
          },
          destroy: () => {
            request.raw.socket.destroy();
            return new Promise(() => {});
          },
        });
      });
      await app.listen({ port: 0, host: '127.0.0.1' });
      const { port } = app.server.address() as AddressInfo;
      return { url: `http://127.0.0.1:${port}`, executions: () => count, close: () => app.close() };
    },
  };
}

function fetchResponder(): Responder {
  return {
    json: (status, body) => Response.json(body, { status }),
    streamThenFail: (status) => {
      let sent = false;
      const stream = new ReadableStream<Uint8Array>({
        async pull(controller) {
          if (!sent) {
            sent = true;
            controller.enqueue(new TextEncoder().encode('x'.repeat(STREAM_CHUNK)));
            return;
          }
          await sleep(20);
          controller.error(new Error('stream failed'));
        },
      });
      return new Response(stream, { status, headers: { 'content-type': 'text/plain' } });
    },
    destroy: () => {
      throw new Error('a fetch handler has no socket to destroy');
    },
  };
}

function fetchRow(): Row {
  return {
    name: 'fetch plain',
    skip: ['destroy'],
    async start(options) {
      let count = 0;
      const handler = async (request: Request): Promise<Response> => {
        await request.text();
        return (await plan(faultOf(request.headers.get('x-fault')), () => ++count, fetchResponder())) as Response;
      };
      const server = createAdaptorServer({ fetch: withIdempotency(handler, options as never) }) as Server;
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    },
  };
}

function honoRow(): Row {
  return {
    name: 'fetch hono',
    skip: ['destroy'],
    async start(options) {
      let count = 0;
      const app = new Hono();
      app.post('/payments', async (c) => {
        await c.req.text();
        return (await plan(faultOf(c.req.header('x-fault')), () => ++count, fetchResponder())) as Response;
      });
      app.onError((_error, c) => c.json({ error: 'boom' }, 500));
      const server = createAdaptorServer({ fetch: withIdempotency(app.fetch, options as never) }) as Server;
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    },
  };
}

/** Every row of the HTTP matrix. */
export const ROWS: readonly Row[] = [
  expressRow(4, 'json', 'route'),
  expressRow(4, 'json', 'before'),
  expressRow(5, 'json', 'before'),
  expressRow(5, 'json', 'after'),
  expressRow(5, 'json', 'route'),
  expressRow(5, 'urlencoded', 'before'),
  expressRow(5, 'urlencoded', 'after'),
  expressRow(5, 'urlencoded', 'route'),
  fastifyRow('send'),
  fastifyRow('hijack'),
  fastifyRow('stream'),
  fetchRow(),
  honoRow(),
];
