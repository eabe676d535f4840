/**
 * oncely/nestjs beyond the shared front-door suite (test/http/front-doors.test.ts
 * runs the same checks as every door on the `nestjs-express` and
 * `nestjs-fastify` rows): which routes are idempotent, per-route settings,
 * the handler's view of its run, scope from a guard, the module's
 * registrations, and answers Nest produces in other ways (StreamableFile,
 * @Res(), an interceptor that wraps values, @Sse(), clients that leave), on
 * both platforms.
 *
 * Decorators are applied by hand: the repository compiles without
 * `experimentalDecorators`. In an application they are written as usual.
 */
import { request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import {
  Body,
  type CallHandler,
  type CanActivate,
  Controller,
  type ExecutionContext,
  Get,
  HttpCode,
  type INestApplication,
  Module,
  type NestInterceptor,
  Post,
  Put,
  Req,
  Res,
  Sse,
  StreamableFile,
  UseGuards,
  UseInterceptors,
} from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { ExpressAdapter } from '@nestjs/platform-express';
import { FastifyAdapter } from '@nestjs/platform-fastify';
import { REPLAYED_HEADER } from 'oncely';
import { type IdempotencyContext as Run, IdempotencyContext, Idempotent, idempotencyOf, OncelyInterceptor, OncelyModule } from 'oncely/nestjs';
import { memoryStore } from 'oncely/stores/memory';
import { map, type Observable, Subject } from 'rxjs';
import { afterEach, describe, expect, it } from 'vitest';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let n = 0;
const newKey = () => `nest-${Date.now()}-${++n}-${Math.random().toString(36).slice(2)}`;

type Platform = 'express' | 'fastify';
type Class = new (...args: never[]) => object;

/** `@decorator` on a method, by hand. */
function on(cls: Class, name: string, ...decorators: MethodDecorator[]): void {
  const proto = cls.prototype as object;
  for (const decorate of decorators) decorate(proto, name, Object.getOwnPropertyDescriptor(proto, name)!);
}
/** A parameter decorator on a method's parameter, by hand. */
function param(cls: Class, name: string, index: number, decorate: ParameterDecorator): void {
  decorate(cls.prototype as object, name, index);
}

const apps: INestApplication[] = [];
afterEach(async () => {
  for (const app of apps.splice(0)) await app.close();
});

async function start(
  platform: Platform,
  module: { imports?: unknown[]; controllers: Class[]; providers?: unknown[] },
  options: { bodyParser?: boolean; globalInterceptors?: NestInterceptor[] } = {},
): Promise<string> {
  class AppModule {}
  Module(module as never)(AppModule);
  const app =
    platform === 'fastify'
      ? await NestFactory.create(AppModule, new FastifyAdapter(), { logger: false })
      : await NestFactory.create(AppModule, new ExpressAdapter(), { logger: false, bodyParser: options.bodyParser ?? true });
  if (options.globalInterceptors) app.useGlobalInterceptors(...options.globalInterceptors);
  apps.push(app);
  await app.listen(0, '127.0.0.1');
  return `http://127.0.0.1:${(app.getHttpServer().address() as AddressInfo).port}`;
}

async function call(
  url: string,
  path: string,
  key: string | undefined,
  body: string | undefined = '{"amount":1}',
  headers: Record<string, string> = {},
  method = 'POST',
) {
  const res = await fetch(`${url}${path}`, {
    method,
    redirect: 'manual',
    headers: { 'content-type': 'application/json', ...(key === undefined ? {} : { 'idempotency-key': key }), ...headers },
    body: method === 'GET' ? undefined : body,
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

/** A controller with a counter: POST / (decorated or not), POST /open, PUT /put, GET /. */
function paymentsController(decorate: { create?: MethodDecorator; open?: MethodDecorator; put?: MethodDecorator; cls?: ClassDecorator } = {}) {
  const state = { runs: 0 };
  class Payments {
    create(body: unknown) {
      return { run: ++state.runs, body };
    }
    open(body: unknown) {
      return { run: ++state.runs, body };
    }
    put(body: unknown) {
      return { run: ++state.runs, body };
    }
    list() {
      return { runs: state.runs };
    }
  }
  Controller('payments')(Payments);
  if (decorate.cls) decorate.cls(Payments);
  on(Payments, 'create', Post(), ...(decorate.create ? [decorate.create] : []));
  on(Payments, 'open', Post('open'), ...(decorate.open ? [decorate.open] : []));
  on(Payments, 'put', Put('put'), ...(decorate.put ? [decorate.put] : []));
  on(Payments, 'list', Get());
  for (const name of ['create', 'open', 'put']) param(Payments, name, 0, Body());
  return { Payments, state };
}

describe.each<Platform>(['express', 'fastify'])('oncely/nestjs on %s', (platform) => {
  describe('which routes are idempotent', () => {
    it("mode 'decorated' (default): only @Idempotent() routes; others pass without a key", async () => {
      const { Payments, state } = paymentsController({ create: Idempotent() });
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Payments] });
      expect((await call(url, '/payments', undefined)).status).toBe(400);
      expect((await call(url, '/payments/open', undefined)).status).toBe(201);
      const key = newKey();
      const first = await call(url, '/payments', key);
      const again = await call(url, '/payments', key);
      expect(again.text).toBe(first.text);
      expect(again.headers.get(REPLAYED_HEADER)).toBe('true');
      expect(state.runs).toBe(2);
    });

    it("mode 'all': every POST and PATCH, except @Idempotent(false); GET passes; a route marked itself applies whatever its method", async () => {
      const { Payments, state } = paymentsController({ open: Idempotent(false), put: Idempotent() });
      const url = await start(platform, {
        imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false, mode: 'all' })],
        controllers: [Payments],
      });
      expect((await call(url, '/payments', undefined)).status).toBe(400);
      expect((await call(url, '/payments/open', undefined)).status).toBe(201);
      expect((await call(url, '/payments', undefined, undefined, {}, 'GET')).status).toBe(200);
      expect((await call(url, '/payments/put', undefined, undefined, {}, 'PUT')).status).toBe(400);
      const key = newKey();
      await call(url, '/payments/put', key, '{"a":1}', {}, 'PUT');
      expect((await call(url, '/payments/put', key, '{"a":1}', {}, 'PUT')).headers.get(REPLAYED_HEADER)).toBe('true');
      expect(state.runs).toBe(2);
    });

    it('@Idempotent() on a controller covers its POST and PATCH routes, not its GET', async () => {
      const { Payments } = paymentsController({ cls: Idempotent() as ClassDecorator });
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Payments] });
      expect((await call(url, '/payments/open', undefined)).status).toBe(400);
      expect((await call(url, '/payments', undefined, undefined, {}, 'GET')).status).toBe(200);
      // PUT is not in `methods`, and the route itself is not marked.
      expect((await call(url, '/payments/put', undefined, undefined, {}, 'PUT')).status).toBe(200);
    });

    it('per-route settings: a route TTL of its own; invalid settings are refused when the class is declared', async () => {
      const { Payments, state } = paymentsController({ create: Idempotent({ ttlMs: 1_500 }) });
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Payments] });
      const key = newKey();
      await call(url, '/payments', key);
      expect((await call(url, '/payments', key)).headers.get(REPLAYED_HEADER)).toBe('true');
      await sleep(2_000);
      expect((await call(url, '/payments', key)).headers.get(REPLAYED_HEADER)).toBeNull();
      expect(state.runs).toBe(2);
      expect(() => Idempotent({ ttlMs: 0 })).toThrow(/ttlMs/);
      expect(() => Idempotent({ lease: 5 } as never)).toThrow(/unknown settings/);
    });
  });

  describe('the handler and the module', () => {
    it('@IdempotencyContext() and idempotencyOf(request) give the handler its run; decide() overrides the policy', async () => {
      const seen: Array<Run | undefined> = [];
      let runs = 0;
      class Orders {
        create(run: Run, req: object) {
          runs++;
          seen.push(run, idempotencyOf(req));
          run.decide('release');
          return { runs };
        }
      }
      Controller('orders')(Orders);
      on(Orders, 'create', Post(), Idempotent());
      param(Orders, 'create', 0, IdempotencyContext());
      param(Orders, 'create', 1, Req());
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Orders] });
      const key = newKey();
      await call(url, '/orders', key);
      await call(url, '/orders', key);
      expect(runs).toBe(2);
      expect(seen[0]).toBe(seen[1]);
      expect(seen[0]).toMatchObject({ key, takeover: false });
      expect(seen[0]!.signal).toBeInstanceOf(AbortSignal);
    });

    it('scope comes from what a guard put on the request; a request without it is refused', async () => {
      class Auth implements CanActivate {
        canActivate(context: ExecutionContext) {
          const req = context.switchToHttp().getRequest<{ headers: Record<string, string>; user?: { account: string } }>();
          if (req.headers['x-user']) req.user = { account: req.headers['x-user'] };
          return true;
        }
      }
      const { Payments, state } = paymentsController({ create: Idempotent() });
      UseGuards(Auth)(Payments);
      const url = await start(platform, {
        imports: [OncelyModule.forRoot({ store: memoryStore(), scope: (req: { user?: { account: string } }) => req.user?.account })],
        controllers: [Payments],
      });
      const key = newKey();
      expect((await call(url, '/payments', key, undefined, { 'x-user': 'a' })).status).toBe(201);
      expect((await call(url, '/payments', key, undefined, { 'x-user': 'b' })).headers.get(REPLAYED_HEADER)).toBeNull();
      expect((await call(url, '/payments', key, undefined, { 'x-user': 'a' })).headers.get(REPLAYED_HEADER)).toBe('true');
      const missing = await call(url, '/payments', newKey());
      expect(missing.status).toBe(400);
      expect(JSON.parse(missing.text).type).toBe('https://oncely.dev/problems/scope-missing');
      expect(state.runs).toBe(2);
    });

    it('global: false with @UseInterceptors(OncelyInterceptor) on one controller; added twice, a request is taken once', async () => {
      const one = paymentsController({ create: Idempotent() });
      UseInterceptors(OncelyInterceptor)(one.Payments);
      class Other {
        create() {
          return { ok: true };
        }
      }
      Controller('other')(Other);
      on(Other, 'create', Post(), Idempotent());
      const url = await start(platform, {
        imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false, global: false })],
        controllers: [one.Payments, Other],
      });
      expect((await call(url, '/payments', undefined)).status).toBe(400);
      expect((await call(url, '/other', undefined)).status).toBe(201);

      // Global and per controller at once: still one claim per request (no 409 from itself).
      const twice = paymentsController({ create: Idempotent() });
      UseInterceptors(OncelyInterceptor)(twice.Payments);
      const url2 = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [twice.Payments] });
      const key = newKey();
      expect((await call(url2, '/payments', key)).status).toBe(201);
      expect((await call(url2, '/payments', key)).headers.get(REPLAYED_HEADER)).toBe('true');
      expect(twice.state.runs).toBe(1);
    });

    it('forRootAsync: options from a factory with injected providers', async () => {
      const CONFIG = 'CONFIG';
      class ConfigModule {}
      Module({ providers: [{ provide: CONFIG, useValue: { ttlMs: 60_000 } }], exports: [CONFIG] })(ConfigModule);
      const { Payments, state } = paymentsController({ create: Idempotent() });
      const url = await start(platform, {
        imports: [
          OncelyModule.forRootAsync({
            imports: [ConfigModule],
            inject: [CONFIG],
            useFactory: async (config: { ttlMs: number }) => ({ store: memoryStore(), scope: false, ttlMs: config.ttlMs }),
          }),
        ],
        controllers: [Payments],
      });
      const key = newKey();
      await call(url, '/payments', key);
      expect((await call(url, '/payments', key)).headers.get(REPLAYED_HEADER)).toBe('true');
      expect(state.runs).toBe(1);
    });
  });

  describe('what is stored is what Nest sends', () => {
    it('a value wrapped by an interceptor of the app, and a thrown HttpException (stored by its status)', async () => {
      class Envelope implements NestInterceptor {
        intercept(_context: ExecutionContext, next: CallHandler): Observable<unknown> {
          return next.handle().pipe(map((data) => ({ data, at: Date.now() })));
        }
      }
      const { Payments, state } = paymentsController({ create: Idempotent() });
      const url = await start(
        platform,
        { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Payments] },
        { globalInterceptors: [new Envelope()] },
      );
      const key = newKey();
      const first = await call(url, '/payments', key);
      expect(JSON.parse(first.text).data.run).toBe(1);
      await sleep(5);
      const again = await call(url, '/payments', key);
      expect(again.text).toBe(first.text);
      expect(state.runs).toBe(1);
    });

    it('@Res() writing the response itself; @HttpCode() is the stored status', async () => {
      let runs = 0;
      class Raw {
        create(res: { status(code: number): { send(body: string): unknown }; header(n: string, v: string): unknown }) {
          runs++;
          res.header('content-type', 'text/plain; charset=utf-8');
          res.status(202).send(`accepted ${runs}`);
        }
        coded() {
          return { runs: ++runs };
        }
      }
      Controller('raw')(Raw);
      on(Raw, 'create', Post(), Idempotent());
      param(Raw, 'create', 0, Res());
      on(Raw, 'coded', Post('coded'), HttpCode(200), Idempotent());
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Raw] });
      const key = newKey();
      expect((await call(url, '/raw', key)).text).toBe('accepted 1');
      const again = await call(url, '/raw', key);
      expect(again.status).toBe(202);
      expect(again.text).toBe('accepted 1');
      expect(again.headers.get('content-type')).toBe('text/plain; charset=utf-8');
      const coded = newKey();
      expect((await call(url, '/raw/coded', coded)).status).toBe(200);
      const codedAgain = await call(url, '/raw/coded', coded);
      expect(codedAgain.status).toBe(200);
      expect(codedAgain.headers.get(REPLAYED_HEADER)).toBe('true');
      expect(runs).toBe(2);
    });

    it('a StreamableFile streams out and completes with a marker: a retry goes to its Location, never runs again', async () => {
      let runs = 0;
      class Exports {
        create(res: { header(n: string, v: string): unknown }) {
          runs++;
          res.header('location', `/exports/${runs}`);
          return new StreamableFile(Readable.from(['a,b\n', '1,2\n']), { type: 'text/csv' });
        }
      }
      Controller('exports')(Exports);
      on(Exports, 'create', Post(), Idempotent());
      param(Exports, 'create', 0, Res({ passthrough: true }));
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Exports] });
      const key = newKey();
      const first = await call(url, '/exports', key);
      expect(first.status).toBe(201);
      expect(first.text).toBe('a,b\n1,2\n');
      await sleep(50);
      const retry = await call(url, '/exports', key);
      expect(retry.status).toBe(303);
      expect(retry.headers.get('location')).toBe('/exports/1');
      expect(runs).toBe(1);
    });

    it('a StreamableFile that fails before its first byte releases the run: a retry runs again', async () => {
      let runs = 0;
      class Exports {
        create() {
          runs++;
          if (runs > 1) return { runs };
          return new StreamableFile(
            new Readable({
              read() {
                this.destroy(new Error('disk gone'));
              },
            }),
          );
        }
      }
      Controller('exports')(Exports);
      on(Exports, 'create', Post(), Idempotent());
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Exports] });
      const key = newKey();
      const failed = await call(url, '/exports', key).catch(() => ({ status: 0 }));
      expect(failed.status).not.toBe(201);
      await sleep(50);
      const retry = await call(url, '/exports', key);
      expect(retry.status).toBe(201);
      expect(JSON.parse(retry.text)).toEqual({ runs: 2 });
      expect(runs).toBe(2);
    });

    it('an @Sse() route marked @Idempotent() streams its events as they come and completes with a marker', async () => {
      let runs = 0;
      const events = new Subject<{ data: { i: number } }>();
      class Events {
        stream() {
          runs++;
          return events;
        }
      }
      Controller('events')(Events);
      on(Events, 'stream', Sse(), Idempotent());
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Events] });
      const key = newKey();
      // The head goes out before any event: were it held until the stream ends, this would never answer.
      const res = await Promise.race([
        fetch(`${url}/events`, { headers: { 'idempotency-key': key } }),
        sleep(10_000).then(() => undefined),
      ]);
      if (res === undefined) events.complete(); // let the app close
      expect(res?.headers.get('content-type')).toMatch(/text\/event-stream/);
      for (const i of [0, 1, 2]) events.next({ data: { i } });
      events.complete();
      const text = await res!.text();
      expect(text.match(/data: /g)).toHaveLength(3);
      const retry = await call(url, '/events', key, undefined, {}, 'GET');
      expect(retry.status).toBe(409);
      expect(JSON.parse(retry.text).type).toBe('https://oncely.dev/problems/completed-not-replayable');
      expect(runs).toBe(1);
    });

    it('a client that hangs up mid-handler: the answer that still comes is stored', async () => {
      let runs = 0;
      let done!: () => void;
      let began!: () => void;
      const finished = new Promise<void>((r) => (done = r));
      const started = new Promise<void>((r) => (began = r));
      class Slow {
        async create() {
          runs++;
          began();
          await sleep(300);
          setTimeout(done, 50);
          return { runs };
        }
      }
      Controller('slow')(Slow);
      on(Slow, 'create', Post(), Idempotent());
      const url = await start(platform, { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Slow] });
      const key = newKey();
      const target = new URL(`${url}/slow`);
      const req = httpRequest({
        host: target.hostname,
        port: target.port,
        path: target.pathname,
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
      });
      req.on('error', () => undefined);
      req.end('{"amount":1}');
      await started;
      req.destroy();
      await finished;
      const retry = await call(url, '/slow', key);
      expect(retry.status).toBe(201);
      expect(retry.headers.get(REPLAYED_HEADER)).toBe('true');
      expect(JSON.parse(retry.text)).toEqual({ runs: 1 });
      expect(runs).toBe(1);
    });
  });
});

describe('oncely/nestjs on express: bodies Nest did not parse', () => {
  it('with bodyParser: false, oncely reads the body within maxBodyBytes and hands it to @Body()', async () => {
    const { Payments, state } = paymentsController({ create: Idempotent() });
    const url = await start(
      'express',
      { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false, maxBodyBytes: 256 })], controllers: [Payments] },
      { bodyParser: false },
    );
    const key = newKey();
    const first = await call(url, '/payments', key, '{"amount":5,"currency":"EUR"}');
    expect(JSON.parse(first.text)).toEqual({ run: 1, body: { amount: 5, currency: 'EUR' } });
    expect((await call(url, '/payments', key, '{ "currency": "EUR", "amount": 5 }')).headers.get(REPLAYED_HEADER)).toBe('true');
    expect((await call(url, '/payments', key, '{"amount":6}')).status).toBe(422);
    expect((await call(url, '/payments', newKey(), '{"amount":')).status).toBe(400);
    expect((await call(url, '/payments', newKey(), JSON.stringify({ pad: 'x'.repeat(300) }))).status).toBe(413);
    expect(state.runs).toBe(1);
  });

  it('a content type the default parsers skip reaches @Body() as a Buffer, fingerprinted by its bytes', async () => {
    const seen: unknown[] = [];
    class Upload {
      create(body: unknown) {
        seen.push(body);
        return { ok: true };
      }
    }
    Controller('upload')(Upload);
    on(Upload, 'create', Post(), Idempotent());
    param(Upload, 'create', 0, Body());
    const url = await start('express', { imports: [OncelyModule.forRoot({ store: memoryStore(), scope: false })], controllers: [Upload] });
    const key = newKey();
    await call(url, '/upload', key, 'plain text', { 'content-type': 'text/plain' });
    expect((await call(url, '/upload', key, 'other text', { 'content-type': 'text/plain' })).status).toBe(422);
    expect(Buffer.isBuffer(seen[0]) && (seen[0] as Buffer).toString()).toBe('plain text');
  });
});
