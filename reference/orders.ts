/**
 * Orders: `POST /orders` (idempotent through oncely) in three recovery
 * points (`req.idempotency.step`), each stored once it completes, so that a
 * retry after a crash resumes after the last completed one:
 *
 * 1. `reserve`: a reservation row, keyed by the step's derived key (a
 *    reserve cut off mid-way and run again finds its row);
 * 2. `pay`: `POST /payments` over real HTTP with `oncely/client`, the step's
 *    derived key as its `Idempotency-Key` (a payment cut off mid-call and
 *    sent again is replayed, not charged again);
 * 3. record the order: in transactional mode through the store's
 *    transaction, committed with the record's completion; otherwise in a
 *    transaction of our own, the order row keeping the idempotency record
 *    id UNIQUE per account.
 *
 * `GET /orders`, `GET /orders/:id` to read them back.
 *
 * @module
 */
import type { FastifyInstance } from 'fastify';
import { FingerprintMismatchError, type IdempotencyContext } from 'oncely';
import { ClientRequestError, createClient } from 'oncely/client';
import type { RouteContext } from './app.js';
import { newId, pause, type Sql } from './db.js';
import type { Payment } from './payments.js';
import { problem, ProblemError } from './problem.js';

/** One line of an order. */
export interface OrderItem {
  sku: string;
  quantity: number;
  /** Unit price, minor units. */
  price: number;
}

/** An order as the API answers it. */
export interface Order {
  id: string;
  status: 'paid';
  currency: string;
  items: OrderItem[];
  /** Sum of quantity × price, minor units. */
  total: number;
  /** The id of the payment that paid it. */
  payment: string;
  created: string;
}

interface OrderBody {
  currency: string;
  items: OrderItem[];
}

interface OrderRow {
  id: string;
  status: 'paid';
  currency: string;
  items: string;
  /** A string from PostgreSQL's BIGINT. */
  total: number | string;
  payment: string;
  created: string;
}

const orderBodySchema = {
  type: 'object',
  required: ['currency', 'items'],
  additionalProperties: false,
  properties: {
    currency: { type: 'string', pattern: '^[A-Z]{3}$' },
    items: {
      type: 'array',
      minItems: 1,
      maxItems: 100,
      items: {
        type: 'object',
        required: ['sku', 'quantity', 'price'],
        additionalProperties: false,
        properties: {
          sku: { type: 'string', minLength: 1, maxLength: 64 },
          quantity: { type: 'integer', minimum: 1, maximum: 1_000_000 },
          price: { type: 'integer', minimum: 1, maximum: Number.MAX_SAFE_INTEGER },
        },
      },
    },
  },
} as const;

const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', minLength: 1, maxLength: 64 } },
} as const;

/** The items as stored: fixed key order, so that equal orders compare equal. */
function itemsText(items: OrderItem[]): string {
  return JSON.stringify(items.map(({ sku, quantity, price }) => ({ sku, quantity, price })));
}

/** An earlier run's order for this record id must be the same order (see payments). */
function sameOperation(existing: OrderRow | undefined, body: OrderBody): OrderRow | undefined {
  if (existing === undefined) return undefined;
  if (existing.currency !== body.currency || existing.items !== itemsText(body.items)) {
    throw new FingerprintMismatchError(
      `This Idempotency-Key already placed order ${existing.id}, for a different request; use a new key.`,
    );
  }
  return existing;
}

function view(row: OrderRow): Order {
  return { ...row, items: JSON.parse(row.items) as OrderItem[], total: Number(row.total) };
}

/** What the reserve step stores: the reservation, and what it was for. */
interface Reservation {
  id: string;
  currency: string;
  items: string;
  total: number;
}

/** What a step's work receives; without oncely (IDEMPOTENCY=off) there is no derived key. */
interface StepRun {
  key: string | undefined;
  signal: AbortSignal | undefined;
}

/** A recovery point when the request has one, else just the work. */
function step<T>(run: IdempotencyContext | undefined, name: string, fn: (step: StepRun) => Promise<T>): Promise<T> {
  if (run === undefined) return fn({ key: undefined, signal: undefined });
  return run.step(name, (s) => fn({ key: s.key, signal: s.signal }));
}

/**
 * A step's stored result belongs to this record id, not to this body: a key
 * released after a failure may come back with another order. Refuse it like
 * a reused key rather than pay for the old one.
 */
function sameOrder(what: string, matches: boolean): void {
  if (!matches) {
    throw new FingerprintMismatchError(`This Idempotency-Key already ${what} for a different order; use a new key.`);
  }
}

/** Register the order routes. */
export async function orderRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { db } = ctx;
  const { orders, reservations } = db.tables;
  const columns = 'id, status, currency, items, total, payment, created';
  const byIdempotency = `SELECT ${columns} FROM ${orders} WHERE account = ? AND idempotency_id = ?`;
  const byId = `SELECT ${columns} FROM ${orders} WHERE account = ? AND id = ?`;
  const list = `SELECT ${columns} FROM ${orders} WHERE account = ? ORDER BY seq`;
  const insert = `INSERT INTO ${orders} (id, account, idempotency_id, currency, items, total, payment, status, created)
     VALUES (?, ?, ?, ?, ?, ?, ?, 'paid', ?)`;
  const reserveRow = db.insertIgnore(reservations, ['id', 'account', 'step_key', 'currency', 'items', 'total', 'status', 'created']);
  const reservationByKey = `SELECT id, currency, items, total FROM ${reservations} WHERE account = ? AND step_key = ?`;
  const markOrdered = `UPDATE ${reservations} SET status = 'ordered', order_id = ? WHERE account = ? AND id = ?`;

  /** Step 1: the reservation row, once per step key (a second run finds the first's row). */
  const reserve = async (account: string, stepKey: string, currency: string, items: string, total: number): Promise<Reservation> => {
    const created = new Date().toISOString();
    await db.run(reserveRow, [newId('rsv'), account, stepKey, currency, items, total, 'held', created]);
    const row = await db.get<Reservation>(reservationByKey, [account, stepKey]);
    if (row === undefined) throw new Error(`reservation ${stepKey} vanished`);
    return { id: row.id, currency: row.currency, items: row.items, total: Number(row.total) };
  };

  /** Step 3: the order row, and the reservation marked as ordered, through `tx`. */
  const record = async (tx: Sql, account: string, idempotencyId: string | null, row: OrderRow, reservation: string): Promise<OrderRow> => {
    if (idempotencyId !== null) {
      const existing = await tx.get<OrderRow>(byIdempotency, [account, idempotencyId]);
      if (existing) return existing; // checked against the request before the steps
    }
    await tx.run(insert, [row.id, account, idempotencyId, row.currency, row.items, row.total, row.payment, row.created]);
    await tx.run(markOrdered, [row.id, account, reservation]);
    return row;
  };

  /** Plain mode: our own transaction; a duplicate refused by the unique index answers the row that won. */
  const recordAlone = async (account: string, idempotencyId: string | null, row: OrderRow, reservation: string): Promise<OrderRow> => {
    try {
      return await db.transaction((tx) => record(tx, account, idempotencyId, row, reservation));
    } catch (error) {
      if (idempotencyId === null || !db.isUniqueViolation(error)) throw error;
      const existing = await db.get<OrderRow>(byIdempotency, [account, idempotencyId]);
      if (existing === undefined) throw error;
      return existing;
    }
  };

  // Retries of the payment call are safe: every attempt carries the same key.
  const client = createClient({ retries: 6, maxDelayMs: 2_000, attemptTimeoutMs: 10_000 + ctx.paymentDelayMs * 2 });

  /** Step 2: pay over HTTP under `key` (without oncely, the client makes its own key for this one call). */
  const pay = async (account: string, body: string, key: string | undefined, signal: AbortSignal | undefined): Promise<Payment> => {
    let response: Response;
    try {
      response = await client.fetch(
        `${ctx.baseUrl()}/payments`,
        {
          method: 'POST',
          headers: { authorization: `Bearer ${account}`, 'content-type': 'application/json' },
          body,
          ...(signal ? { signal } : {}),
        },
        key === undefined ? {} : { key },
      );
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      if (!(error instanceof ClientRequestError)) throw error;
      // Unknown whether the payment happened: a retry of the order finds out safely.
      throw new ProblemError(
        problem('payment-pending', `The payment service did not answer (${error.reason}); retry the order with the same key.`),
        { 'retry-after': '1' },
      );
    }
    if (response.status !== 201) {
      const upstream = await response.text();
      if (response.status === 409 || response.status === 503) {
        throw new ProblemError(
          problem('payment-pending', `The payment is still in progress (${response.status}); retry the order with the same key.`),
          { 'retry-after': response.headers.get('retry-after') ?? '1' },
        );
      }
      throw new ProblemError(
        problem('payment-failed', `The payment service answered ${response.status}.`, {
          paymentStatus: response.status,
          paymentProblem: safeJson(upstream),
        }),
      );
    }
    return (await response.json()) as Payment;
  };

  app.post<{ Body: OrderBody }>('/orders', { schema: { body: orderBodySchema } }, async (request, reply) => {
    const account = request.account;
    const run = request.idempotency;
    const idempotencyId = run?.id ?? null;
    if (idempotencyId !== null) {
      const existing = sameOperation(await db.get<OrderRow>(byIdempotency, [account, idempotencyId]), request.body);
      if (existing) return reply.code(201).header('location', `/orders/${existing.id}`).send(view(existing));
    }
    const { currency, items } = request.body;
    let total = 0;
    for (const item of items) total += item.quantity * item.price;
    if (!Number.isSafeInteger(total)) {
      throw new ProblemError(problem('validation', 'The order total is too large to charge.'));
    }
    const itemList = itemsText(items);

    // 1. Reserve.
    const reservation = await step(run, 'reserve', ({ key }) => reserve(account, key ?? newId('key'), currency, itemList, total));
    sameOrder(`reserved ${reservation.id}`, reservation.currency === currency && reservation.items === itemList && reservation.total === total);
    await ctx.crash('orders', 'after-step:reserve');

    // 2. Pay. The payment body depends only on the order request, so a pay
    // step run again sends the same request under the same key: a replay.
    const paymentBody = JSON.stringify({ amount: total, currency, description: `order of ${items.length} item(s)` });
    const payment = await step(run, 'pay', ({ key, signal }) => pay(account, paymentBody, key, signal));
    sameOrder(`paid ${payment.id}`, payment.amount === total && payment.currency === currency);
    await ctx.crash('orders', 'after-step:pay');

    // A window between paying and recording the order (ORDER_DELAY_MS), to crash in.
    await pause(ctx.orderDelayMs, run?.signal);
    if (run?.signal.aborted) throw run.signal.reason;

    // 3. Record.
    const fresh: OrderRow = {
      id: newId('ord'),
      status: 'paid',
      currency,
      items: itemList,
      total,
      payment: payment.id,
      created: new Date().toISOString(),
    };
    const row =
      ctx.transactional && run
        ? await record(db.over(await run.transaction()), account, idempotencyId, fresh, reservation.id)
        : await recordAlone(account, idempotencyId, fresh, reservation.id);
    await ctx.crash('orders', 'after-business-write');
    return reply.code(201).header('location', `/orders/${row.id}`).send(view(row));
  });

  app.get('/orders', async (request) => ({ data: (await db.all<OrderRow>(list, [request.account])).map(view) }));

  app.get<{ Params: { id: string } }>('/orders/:id', { schema: { params: idParams } }, async (request) => {
    const row = await db.get<OrderRow>(byId, [request.account, request.params.id]);
    if (!row) throw new ProblemError(problem('not-found', `This account has no order ${request.params.id}.`));
    return view(row);
  });
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text.slice(0, 500);
  }
}
