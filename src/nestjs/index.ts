/**
 * `Idempotency-Key` for NestJS 11, on the Express and the Fastify platform:
 * a module, a route decorator and an interceptor.
 *
 * @example
 * ```ts
 * import { Body, Controller, Module, Post } from '@nestjs/common';
 * import { Idempotent, IdempotencyContext, OncelyModule } from 'oncely/nestjs';
 * import { memoryStore } from 'oncely/stores/memory';
 *
 * @Controller('payments')
 * class PaymentsController {
 *   @Post()
 *   @Idempotent()
 *   create(@Body() body: { amount: number }, @IdempotencyContext() run: IdempotencyContext) {
 *     return { id: `pay_${run.id.slice(0, 8)}`, amount: body.amount };
 *   }
 * }
 *
 * @Module({
 *   imports: [OncelyModule.forRoot({ store: memoryStore(), scope: (req) => req.headers['x-account'] as string })],
 *   controllers: [PaymentsController],
 * })
 * export class AppModule {}
 * ```
 * @module
 */
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import {
  type CallHandler,
  createParamDecorator,
  type CustomDecorator,
  type DynamicModule,
  type ExecutionContext,
  Inject,
  Injectable,
  type InjectionToken,
  Module,
  type ModuleMetadata,
  type NestInterceptor,
  type OptionalFactoryDependency,
  type Provider,
  SetMetadata,
  StreamableFile,
} from '@nestjs/common';
import { checkDuration } from '../engine/engine.js';
import { BodyInvalidError, BodyTooLargeError, ConfigError, isOncelyError } from '../errors/index.js';
import {
  type IdempotencyContext as CoreContext,
  HttpIdempotency,
  type HttpIdempotencyOptions,
  type HttpRequestView,
  type HttpRun,
  type RouteOverrides,
} from '../http/core.js';
import { fieldLines } from '../http/headers.js';
import type { HttpResponse } from '../http/outcome.js';
import { capture } from './capture.js';

export type { RouteOverrides } from '../http/core.js';
export type { OutcomeDecision } from '../http/policy.js';

/** What a handler can see and decide about its own idempotent run (see {@link IdempotencyContext} the decorator). */
export type IdempotencyContext = CoreContext;

/**
 * The request Nest hands to guards and interceptors: Express's `Request` or
 * Fastify's `FastifyRequest`, typed loosely so that neither platform's
 * types are needed. Annotate `scope`'s parameter with your platform's type
 * (plus what your guards add) for more.
 */
export interface NestRequest {
  method: string;
  url: string;
  headers: IncomingHttpHeaders;
  body?: unknown;
  [key: string]: unknown;
}

/**
 * Options of {@link OncelyModule.forRoot}: every option of the other front
 * doors (see {@link HttpIdempotencyOptions}; `scope` and `fingerprint` get
 * the request as Nest hands it to guards, after them), plus which routes
 * are idempotent and how the interceptor is registered.
 */
export interface NestIdempotencyOptions<R = NestRequest> extends HttpIdempotencyOptions<R> {
  /**
   * `'decorated'` (default): only routes marked with {@link Idempotent}, or
   * routes whose method is in `methods` on a controller marked with it.
   * `'all'`: every route whose method is in `methods` (POST and PATCH by
   * default), except those marked `@Idempotent(false)`.
   */
  mode?: 'decorated' | 'all';
  /**
   * Register {@link OncelyInterceptor} for the whole application (default
   * `true`). With `false`, add `@UseInterceptors(OncelyInterceptor)` to the
   * controllers that need it.
   */
  global?: boolean;
}

/** Options of {@link OncelyModule.forRootAsync}: the options come from a factory with injected dependencies. */
export interface OncelyModuleAsyncOptions<R = NestRequest> {
  /** Modules whose providers `useFactory` needs. */
  imports?: ModuleMetadata['imports'];
  /** Providers given to `useFactory`, in order. */
  inject?: Array<InjectionToken | OptionalFactoryDependency>;
  /** Make the options (a store from your configuration, for example). `mode` is read from them; `global` is not. */
  useFactory: (...args: never[]) => NestIdempotencyOptions<R> | Promise<NestIdempotencyOptions<R>>;
  /** See {@link NestIdempotencyOptions.global}; here, since it must be known before the factory runs. Default `true`. */
  global?: boolean;
}

type Warn = (message: string) => void;

interface Oncely {
  readonly core: HttpIdempotency<unknown>;
  readonly mode: 'decorated' | 'all';
  readonly warn: Warn;
}

/** The request as either platform hands it over (Express: an IncomingMessage; Fastify: a wrapper with `raw`). */
interface AnyRequest extends NestRequest {
  originalUrl?: string;
  raw?: IncomingMessage;
  idempotency?: IdempotencyContext;
}

/** Fastify's reply; Express's response is a ServerResponse itself. */
interface FastifyLikeReply {
  raw: ServerResponse;
  code(status: number): unknown;
  header(name: string, value: string): unknown;
  send(payload: unknown): unknown;
}

type Body = HttpRequestView<unknown>['body'];

/**
 * rxjs's Observable, by way of Nest's types: oncely declares no dependency
 * on rxjs (a peer of @nestjs/common), so it neither imports it nor names it
 * in its declarations.
 */
type Stream = ReturnType<CallHandler['handle']>;
type Subscription = ReturnType<Stream['subscribe']>;
interface Subscriber {
  next(value: unknown): void;
  error(error: unknown): void;
  complete(): void;
}
type StreamClass = new (subscribe: (subscriber: Subscriber) => () => void) => Stream;

const ONCELY = Symbol('oncely');
const IDEMPOTENT = 'oncely:idempotent';
// Nest's own metadata key for @Sse() routes (SSE_METADATA in @nestjs/common/constants).
const SSE = '__sse__';

const contexts = new WeakMap<object, IdempotencyContext>();
// Requests an interceptor already took: a second one (global and per controller) passes them through.
const taken = new WeakSet<object>();

/**
 * The idempotent run of a request, from the request object (Express's or
 * Fastify's, or Fastify's raw one): for code that has the request but not
 * the parameter decorator. `request.idempotency` holds the same.
 *
 * @example
 * ```ts
 * const run = idempotencyOf(request);
 * await psp.charge(amount, { idempotencyKey: run?.id, signal: run?.signal });
 * ```
 */
export function idempotencyOf(request: object): IdempotencyContext | undefined {
  return contexts.get(request);
}

/**
 * A handler parameter: the request's idempotent run (`key`, `id`,
 * `takeover`, `signal`, `decide`), or `undefined` when the route is not
 * idempotent for this request.
 *
 * @example
 * ```ts
 * @Post()
 * @Idempotent()
 * create(@Body() body: CreatePayment, @IdempotencyContext() run: IdempotencyContext) {
 *   return this.payments.create(body, { uniqueKey: run.id, signal: run.signal });
 * }
 * ```
 */
export const IdempotencyContext: () => ParameterDecorator = createParamDecorator((_data: unknown, ctx: ExecutionContext) =>
  contexts.get(ctx.switchToHttp().getRequest<object>()),
);

const ROUTE_SETTINGS = new Set(['ttlMs', 'leaseMs', 'wait']);

function checkSettings(settings: unknown): void {
  const name = '@Idempotent()';
  if (typeof settings !== 'object' || settings === null || Array.isArray(settings)) {
    throw new ConfigError(`${name} takes false or { ttlMs?, leaseMs?, wait? }; got ${String(settings)}.`);
  }
  const unknown = Object.keys(settings).filter((key) => !ROUTE_SETTINGS.has(key));
  if (unknown.length > 0) {
    throw new ConfigError(`${name} has unknown settings ${unknown.map((k) => `\`${k}\``).join(', ')}; known: ttlMs, leaseMs, wait.`);
  }
  const { ttlMs, leaseMs, wait } = settings as RouteOverrides;
  checkDuration(`${name}: ttlMs`, ttlMs);
  checkDuration(`${name}: leaseMs`, leaseMs);
  if (wait === undefined || wait === false) return;
  if (typeof wait !== 'object' || wait === null) throw new ConfigError(`${name}: wait must be false or { timeoutMs, pollMs? }.`);
  checkDuration(`${name}: wait.timeoutMs`, wait.timeoutMs);
  checkDuration(`${name}: wait.pollMs`, wait.pollMs);
}

/**
 * Mark a route, or every route of a controller, as idempotent, with its own
 * retention, lease or wait if given (checked now, when the class is
 * declared). On a route it applies whatever the method; on a controller, to
 * its routes whose method is in `methods`. `@Idempotent(false)` takes a
 * route (or controller) out, for `mode: 'all'`.
 *
 * @throws {@link ConfigError} for invalid settings.
 * @example
 * ```ts
 * @Post()
 * @Idempotent({ ttlMs: 3_600_000, wait: { timeoutMs: 5_000 } })
 * create(@Body() body: CreatePayment) { ... }
 *
 * @Post('login')
 * @Idempotent(false) // with mode: 'all'
 * login(@Body() body: Credentials) { ... }
 * ```
 */
export function Idempotent(settings: RouteOverrides | false = {}): CustomDecorator<string> {
  if (settings !== false) checkSettings(settings);
  return SetMetadata(IDEMPOTENT, settings);
}

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

function isJson(type: string | undefined): boolean {
  return type !== undefined && /^application\/([\w.+-]*\+)?json\b/i.test(type);
}

/** The body a parser left in `req.body`, for the fingerprint. */
function parsedBody(body: unknown): Body {
  if (body === undefined || body === null) return undefined;
  if (typeof body === 'string' || body instanceof Uint8Array) return { raw: body };
  return { json: body };
}

/**
 * Express, for a content type Nest's body parsers left alone (or with
 * `bodyParser: false`): read the body within `limit` and leave it parsed in
 * `req.body` for `@Body()`, as oncely/express does.
 */
async function readBody(req: AnyRequest & IncomingMessage, limit: number): Promise<Body> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > limit) throw new BodyTooLargeError(limit);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new BodyTooLargeError(limit);
    chunks.push(chunk);
  }
  const raw = Buffer.concat(chunks);
  const type = req.headers['content-type'];
  // body-parser mounted later leaves a body marked parsed alone.
  (req as { _body?: boolean })._body = true;
  if (isJson(type)) {
    let parsed: unknown;
    try {
      parsed = raw.length === 0 ? undefined : JSON.parse(raw.toString('utf8'));
    } catch (error) {
      throw new BodyInvalidError('The request body is not valid JSON.', { cause: error });
    }
    req.body = parsed;
    return parsed === undefined ? undefined : { json: parsed };
  }
  if (type !== undefined && /^application\/x-www-form-urlencoded\b/i.test(type)) {
    req.body = Object.fromEntries(new URLSearchParams(raw.toString('utf8')));
  } else {
    req.body = raw;
  }
  return { raw };
}

function bodyOf(req: AnyRequest, limit: number): Body | Promise<Body> {
  // Fastify parsed the body before the route ran (or refused it with 415).
  if (req.raw !== undefined) return parsedBody(req.body);
  const message = req as AnyRequest & IncomingMessage;
  const consumed = (message as { _body?: unknown })._body === true || message.readableDidRead || message.readableEnded;
  if (!consumed && hasBody(message)) return readBody(message, limit);
  return parsedBody(req.body);
}

function isFastifyReply(res: unknown): res is FastifyLikeReply {
  return typeof (res as FastifyLikeReply).code === 'function' && typeof (res as FastifyLikeReply).raw === 'object';
}

/** Answer from oncely (a replay or a problem), without running the handler. */
function respond(res: ServerResponse | FastifyLikeReply, response: HttpResponse): void {
  const body = typeof response.body === 'string' ? Buffer.from(response.body) : Buffer.from(response.body);
  if (isFastifyReply(res)) {
    // Through Fastify, so that its onSend and onResponse hooks see the answer.
    res.code(response.status);
    for (const [name, value] of response.headers) res.header(name, value);
    res.send(body);
    return;
  }
  res.statusCode = response.status;
  for (const [name, value] of response.headers) res.setHeader(name, value);
  res.end(body);
}

/**
 * The interceptor that makes routes idempotent. {@link OncelyModule}
 * registers it for the whole application unless `global: false`; then add
 * it per controller with `@UseInterceptors(OncelyInterceptor)`. Added twice
 * (globally and per controller), a request is still taken once.
 *
 * It runs after guards (so `scope` can read what authentication put on the
 * request) and before pipes. On a replay or a problem it answers on the
 * response itself and the handler never runs (the returned observable
 * never emits: Nest must not send a second answer). Otherwise it watches
 * the raw Node response under Nest, so what is stored is exactly what goes
 * out: the value Nest serialised with its status, an exception filter's
 * answer (a thrown `HttpException`'s status goes through the outcome
 * policy; an unknown error's 500 is released), `@Res()` writes, a
 * `StreamableFile` (sent as it streams, completing with a marker).
 *
 * @example
 * ```ts
 * @Controller('payments')
 * @UseInterceptors(OncelyInterceptor) // with OncelyModule.forRoot({ ..., global: false })
 * export class PaymentsController {}
 * ```
 */
export class OncelyInterceptor implements NestInterceptor {
  readonly #oncely: Oncely;

  constructor(oncely: Oncely) {
    this.#oncely = oncely;
  }

  /** Take the request under a claim, answer it from the store, or let it through. */
  intercept(context: ExecutionContext, next: CallHandler): Stream {
    // Lazy: nothing runs until it is subscribed to.
    const handled = next.handle();
    if (context.getType() !== 'http') return handled;
    const http = context.switchToHttp();
    const req = http.getRequest<AnyRequest>();
    const settings = this.#settingsOf(context, req.method);
    if (settings === undefined || taken.has(req)) return handled;
    taken.add(req);
    const res = http.getResponse<ServerResponse | FastifyLikeReply>();
    const sse = Reflect.getMetadata(SSE, context.getHandler()) !== undefined;
    // An Observable of the rxjs Nest runs on, without importing rxjs (see Stream).
    const Observable = handled.constructor as StreamClass;
    return new Observable((subscriber) => {
      let inner: Subscription | undefined;
      let closed = false;
      this.#begin(req, res, settings).then(
        (run) => {
          // Answered here (a replay, a problem): never emit, so Nest sends nothing more.
          if (run === 'answered') return;
          if (run === 'pass') {
            if (!closed) inner = handled.subscribe(subscriber);
            return;
          }
          if (closed) {
            // Nothing will run this request any more (an outer interceptor gave up): release it.
            void this.#oncely.core.fail(run, 'request abandoned before its handler');
            return;
          }
          const raw = isFastifyReply(res) ? res.raw : res;
          const held = capture(raw, this.#oncely.core, run, this.#oncely.warn);
          if (sse) held.stream();
          // The client hung up while the claim was taken: its 'close' has passed already.
          if (raw.destroyed) this.#oncely.core.gone(run);
          inner = handled.subscribe({
            next: (value) => {
              if (value instanceof StreamableFile) held.stream(value.getStream());
              subscriber.next(value);
            },
            error: (error: unknown) => subscriber.error(error),
            complete: () => subscriber.complete(),
          });
        },
        (error: unknown) => subscriber.error(error),
      );
      return () => {
        closed = true;
        inner?.unsubscribe();
      };
    });
  }

  /** The route's settings when this request is to be made idempotent, else `undefined`. */
  #settingsOf(context: ExecutionContext, method: string): RouteOverrides | undefined {
    const onRoute = Reflect.getMetadata(IDEMPOTENT, context.getHandler()) as RouteOverrides | false | undefined;
    const onClass = Reflect.getMetadata(IDEMPOTENT, context.getClass()) as RouteOverrides | false | undefined;
    if (onRoute === false) return undefined;
    // Marked on the route itself: whatever its method.
    if (onRoute !== undefined) return onClass ? { ...onClass, ...onRoute } : onRoute;
    if (onClass === false) return undefined;
    if (onClass === undefined && this.#oncely.mode !== 'all') return undefined;
    return this.#oncely.core.applies(method) ? (onClass ?? {}) : undefined;
  }

  async #begin(req: AnyRequest, res: ServerResponse | FastifyLikeReply, settings: RouteOverrides): Promise<HttpRun | 'answered' | 'pass'> {
    const { core } = this.#oncely;
    try {
      const body = await bodyOf(req, core.maxBodyBytes);
      const url = req.originalUrl ?? req.url;
      const q = url.indexOf('?');
      const begun = await core.begin(
        {
          raw: req,
          method: req.method,
          path: q < 0 ? url : url.slice(0, q),
          query: q < 0 ? '' : url.slice(q + 1),
          header: (name) => fieldLines(req.headers[name]),
          body,
        },
        settings,
      );
      if (begun.kind === 'pass') return 'pass';
      if (begun.kind === 'respond') {
        respond(res, begun.response);
        return 'answered';
      }
      const { run } = begun;
      req.idempotency = run.context;
      contexts.set(req, run.context);
      if (req.raw !== undefined) contexts.set(req.raw, run.context);
      return run;
    } catch (error) {
      if (!isOncelyError(error)) throw error;
      const problem = core.problem(error);
      if (error instanceof BodyTooLargeError) problem.headers.push(['connection', 'close']);
      respond(res, problem);
      return 'answered';
    }
  }
}
Injectable()(OncelyInterceptor);
Inject(ONCELY)(OncelyInterceptor, undefined, 0);

function oncelyOf(options: NestIdempotencyOptions<never>): Oncely {
  const mode = options.mode ?? 'decorated';
  if (mode !== 'decorated' && mode !== 'all') throw new ConfigError(`mode must be 'decorated' or 'all'; got ${String(mode)}.`);
  const logger = options.logger ?? console;
  return { core: new HttpIdempotency<unknown>(options as HttpIdempotencyOptions<unknown>), mode, warn: (message) => logger.warn(message) };
}

function moduleWith(oncely: Provider, global: boolean, imports: ModuleMetadata['imports'] = []): DynamicModule {
  return {
    module: OncelyModule,
    // Global, so that @UseInterceptors(OncelyInterceptor) resolves in any module.
    global: true,
    imports,
    providers: [
      oncely,
      OncelyInterceptor,
      // APP_INTERCEPTOR of @nestjs/core, by its value: oncely needs only @nestjs/common.
      ...(global ? [{ provide: 'APP_INTERCEPTOR', useExisting: OncelyInterceptor }] : []),
    ],
    exports: [ONCELY, OncelyInterceptor],
  };
}

/**
 * The oncely module. Import it once, in the root module, with
 * {@link OncelyModule.forRoot} or {@link OncelyModule.forRootAsync}.
 *
 * @example
 * ```ts
 * @Module({
 *   imports: [
 *     OncelyModule.forRoot({ store: redisStore({ client: redis }), scope: (req: AuthedRequest) => req.user.accountId }),
 *   ],
 * })
 * export class AppModule {}
 * ```
 */
// biome-ignore lint/complexity/noStaticOnlyClass: Nest modules are classes; forRoot() is Nest's convention.
export class OncelyModule {
  /**
   * Configure oncely with options known now.
   *
   * @throws {@link ConfigError} for invalid options.
   * @example
   * ```ts
   * OncelyModule.forRoot({ store: memoryStore(), scope: (req) => req.headers['x-account'] as string, mode: 'all' });
   * ```
   */
  static forRoot<R = NestRequest>(options: NestIdempotencyOptions<R>): DynamicModule {
    const oncely = oncelyOf(options as NestIdempotencyOptions<never>);
    return moduleWith({ provide: ONCELY, useValue: oncely }, options.global ?? true);
  }

  /**
   * Configure oncely with options made by a factory, from injected
   * providers (configuration, a database client for the store).
   *
   * @example
   * ```ts
   * OncelyModule.forRootAsync({
   *   imports: [ConfigModule],
   *   inject: [ConfigService],
   *   useFactory: (config: ConfigService) => ({
   *     store: redisStore({ client: new Redis(config.getOrThrow('REDIS_URL')) }),
   *     scope: (req: AuthedRequest) => req.user.accountId,
   *   }),
   * });
   * ```
   */
  static forRootAsync<R = NestRequest>(options: OncelyModuleAsyncOptions<R>): DynamicModule {
    const factory = options.useFactory as (...args: unknown[]) => NestIdempotencyOptions<R> | Promise<NestIdempotencyOptions<R>>;
    return moduleWith(
      {
        provide: ONCELY,
        useFactory: async (...args: unknown[]) => oncelyOf((await factory(...args)) as NestIdempotencyOptions<never>),
        inject: options.inject ?? [],
      },
      options.global ?? true,
      options.imports,
    );
  }
}
Module({})(OncelyModule);
