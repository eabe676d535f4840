/**
 * The same payment handler behind each front door, for the DESIGN 4 matrix.
 * The handler counts its executions; request headers steer it:
 * `x-delay` (ms to sleep), `x-status` (status to answer), `x-throw` (throw),
 * `x-big` (answer a body of that many bytes).
 */
import type { AddressInfo } from 'node:net';
import { createServer, type Server } from 'node:http';
import { createAdaptorServer } from '@hono/node-server';
import { Controller, Get, HttpException, Module, Post, Req, Res } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { ExpressAdapter, type NestExpressApplication } from '@nestjs/platform-express';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import express from 'express';
import express4 from 'express4';
import Fastify from 'fastify';
import { Hono } from 'hono';
import Koa from 'koa';
import middy from '@middy/core';
import type { HttpIdempotencyOptions } from 'oncely';
import { idempotency } from 'oncely/express';
import { oncely } from 'oncely/fastify';
import { withIdempotency } from 'oncely/fetch';
import { idempotency as koaIdempotency } from 'oncely/koa';
import { idempotency as middyIdempotency, type LambdaHttpEvent, withIdempotency as withLambdaIdempotency } from 'oncely/lambda';
import { Idempotent, OncelyModule } from 'oncely/nestjs';
import { apiGateway, eventBody, eventHeader } from './fixtures/lambda/server.js';

export const DOORS = ['express5', 'express4', 'fastify', 'fetch', 'hono', 'koa', 'nestjs-express', 'nestjs-fastify', 'lambda-rest', 'lambda-middy'] as const;
export type Door = (typeof DOORS)[number];

export interface TestApp {
  url: string;
  /** Executions of the payment handler so far. */
  executions(): number;
  close(): Promise<void>;
}

type Options = HttpIdempotencyOptions<never>;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Effect {
  status: number;
  body: string;
  headers: Record<string, string>;
}

/** The business logic, framework-free: returns what to answer. */
async function pay(count: number, headers: (name: string) => string | undefined, body: unknown): Promise<Effect> {
  const delay = Number(headers('x-delay') ?? 0);
  if (delay > 0) await sleep(delay);
  if (headers('x-throw')) throw new Error('handler failed');
  const status = Number(headers('x-status') ?? 201);
  const big = Number(headers('x-big') ?? 0);
  const id = `pay_${count}`;
  const payload = big > 0 ? { id, pad: 'x'.repeat(big) } : { id, amount: (body as { amount?: number })?.amount ?? null };
  return {
    status,
    body: JSON.stringify(payload),
    headers: {
      'content-type': 'application/json; charset=utf-8',
      location: `/payments/${id}`,
      'set-cookie': `session=${count}`,
      'x-request-id': `req-${count}`,
      'x-payment-batch': `batch-${count}`,
    },
  };
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

/** Start the payment app behind one front door with these oncely options. */
export async function startApp(door: Door, options: Options): Promise<TestApp> {
  let count = 0;
  const opts = { scope: (() => 'acct') as never, ...options };
  switch (door) {
    case 'express5':
    case 'express4': {
      const factory = (door === 'express5' ? express : express4) as unknown as typeof express;
      const app = factory();
      app.use(idempotency(opts as never));
      app.post('/payments', express.json(), async (req, res, next) => {
        try {
          const effect = await pay(++count, (n) => req.get(n), req.body);
          res.status(effect.status).set(effect.headers).send(effect.body);
        } catch (error) {
          next(error);
        }
      });
      app.get('/payments', (_req, res) => {
        res.json({ count });
      });
      // Express 4 would not catch a rejected promise; the handler above calls next itself.
      app.use((_error: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
        res.status(500).json({ error: 'boom' });
      });
      const server = createServer(app);
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    }
    case 'fastify': {
      const app = Fastify();
      await app.register(oncely, opts as never);
      app.post('/payments', async (req, reply) => {
        const effect = await pay(++count, (n) => req.headers[n] as string | undefined, req.body);
        return reply.code(effect.status).headers(effect.headers).send(effect.body);
      });
      app.get('/payments', async () => ({ count }));
      await app.listen({ port: 0, host: '127.0.0.1' });
      const { port } = app.server.address() as AddressInfo;
      return { url: `http://127.0.0.1:${port}`, executions: () => count, close: () => app.close() };
    }
    case 'fetch': {
      const handler = async (request: Request): Promise<Response> => {
        if (request.method === 'GET') return Response.json({ count });
        const text = await request.text();
        const effect = await pay(++count, (n) => request.headers.get(n) ?? undefined, text ? JSON.parse(text) : undefined);
        return new Response(effect.body, { status: effect.status, headers: effect.headers });
      };
      const server = createAdaptorServer({ fetch: withIdempotency(handler, opts as never) }) as Server;
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    }
    case 'hono': {
      const app = new Hono();
      app.post('/payments', async (c) => {
        const body = await c.req.json().catch(() => undefined);
        const effect = await pay(++count, (n) => c.req.header(n), body);
        return c.body(effect.body, effect.status as 201, effect.headers);
      });
      app.get('/payments', (c) => c.json({ count }));
      app.onError((_error, c) => c.json({ error: 'boom' }, 500));
      const server = createAdaptorServer({ fetch: withIdempotency(app.fetch, opts as never) }) as Server;
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    }
    case 'koa': {
      const app = new Koa();
      app.silent = true;
      app.use(koaIdempotency(opts as never));
      app.use(async (ctx) => {
        if (ctx.path !== '/payments') return;
        if (ctx.method === 'GET') {
          ctx.body = { count };
          return;
        }
        // No body parser: oncely read the body and left it parsed.
        const effect = await pay(++count, (n) => ctx.get(n) || undefined, (ctx.request as { body?: unknown }).body);
        ctx.status = effect.status;
        ctx.set(effect.headers);
        ctx.body = effect.body;
      });
      const server = createServer(app.callback());
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    }
    case 'lambda-rest':
    case 'lambda-middy': {
      // The wrapper on REST API events, the Middy middleware on HTTP API events, behind a local API Gateway.
      const handler = async (event: LambdaHttpEvent) => {
        if (event.httpMethod === 'GET' || (event.requestContext as { http?: { method: string } }).http?.method === 'GET') {
          return { statusCode: 200, body: JSON.stringify({ count }) };
        }
        const text = eventBody(event);
        const effect = await pay(++count, (n) => eventHeader(event, n), text ? JSON.parse(text) : undefined);
        return { statusCode: effect.status, headers: effect.headers, body: effect.body };
      };
      const lambda = door === 'lambda-rest' ? withLambdaIdempotency(handler, opts as never) : middy(handler).use(middyIdempotency(opts as never));
      const server = apiGateway(lambda, door === 'lambda-rest' ? 'rest' : 'http-api');
      const url = await listen(server);
      return { url, executions: () => count, close: () => closeServer(server) };
    }
    case 'nestjs-express':
    case 'nestjs-fastify': {
      const app = await startNest(door === 'nestjs-fastify', opts, () => ++count, () => count);
      return { ...app, executions: () => count };
    }
  }
}

type NestHeaders = Record<string, string | string[] | undefined>;
/** Express's response and Fastify's reply both have these. */
interface NestResponse {
  status(code: number): unknown;
  header(name: string, value: string): unknown;
}

/**
 * The payment app as a Nest application on either platform, written as Nest
 * users write it: the handler returns a value for Nest to serialise, throws
 * an HttpException for an error status, and an Error for a failure.
 * Decorators are applied by hand (the repository compiles without
 * `experimentalDecorators`); in an app they are the usual `@Post()` etc.
 */
async function startNest(fastify: boolean, opts: Options, next: () => number, count: () => number) {
  class PaymentsController {
    async create(req: { headers: NestHeaders; body: unknown }, res: NestResponse) {
      const effect = await pay(next(), (n) => req.headers[n] as string | undefined, req.body);
      for (const [name, value] of Object.entries(effect.headers)) res.header(name, value);
      if (effect.status >= 400) throw new HttpException(JSON.parse(effect.body), effect.status);
      res.status(effect.status);
      return JSON.parse(effect.body);
    }
    list() {
      return { count: count() };
    }
  }
  const proto = PaymentsController.prototype;
  const method = (name: 'create' | 'list') => Object.getOwnPropertyDescriptor(proto, name)!;
  Controller('payments')(PaymentsController);
  Post()(proto, 'create', method('create'));
  Idempotent()(proto, 'create', method('create'));
  Req()(proto, 'create', 0);
  Res({ passthrough: true })(proto, 'create', 1);
  Get()(proto, 'list', method('list'));
  class AppModule {}
  Module({ imports: [OncelyModule.forRoot(opts as never)], controllers: [PaymentsController] })(AppModule);
  const app = fastify
    ? await NestFactory.create(AppModule, new FastifyAdapter(), { logger: false })
    : await NestFactory.create<NestExpressApplication>(AppModule, new ExpressAdapter(), { logger: false });
  // Nest's default JSON limit is 100 kB; the other doors read up to maxBodyBytes (1 MiB).
  if (!fastify) (app as NestExpressApplication).useBodyParser('json', { limit: '1mb' });
  await app.listen(0, '127.0.0.1');
  const { port } = app.getHttpServer().address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, close: () => app.close() };
}
