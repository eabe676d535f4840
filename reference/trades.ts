/**
 * Trades: `POST /execute-trade` (idempotent through oncely), and
 * `GET /trades`, `GET /trades/:id` to inspect them. Like payments: in
 * transactional mode the trade row commits with the record's completion;
 * otherwise it keeps the idempotency record id, UNIQUE per account, so a
 * re-executed request never trades twice.
 *
 * @module
 */
import type { FastifyInstance } from 'fastify';
import { FingerprintMismatchError } from 'oncely';
import type { RouteContext } from './app.js';
import { newId, type Sql } from './db.js';
import { problem, ProblemError } from './problem.js';

/** A trade as the API answers it. */
export interface Trade {
  id: string;
  symbol: string;
  side: 'buy' | 'sell';
  quantity: number;
  price: number;
  status: 'executed';
  created: string;
}

interface TradeBody {
  symbol: string;
  side: 'buy' | 'sell';
  quantity: number;
  price: number;
}

const tradeBodySchema = {
  type: 'object',
  required: ['symbol', 'side', 'quantity', 'price'],
  additionalProperties: false,
  properties: {
    symbol: { type: 'string', pattern: '^[A-Z0-9][A-Z0-9.\\-]{0,15}$' },
    side: { type: 'string', enum: ['buy', 'sell'] },
    quantity: { type: 'integer', minimum: 1, maximum: Number.MAX_SAFE_INTEGER },
    price: { type: 'number', exclusiveMinimum: 0, maximum: 1e15 },
  },
} as const;

const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'string', minLength: 1, maxLength: 64 } },
} as const;

/** A trade row: BIGINT columns arrive as strings from PostgreSQL. */
type TradeRow = Omit<Trade, 'quantity'> & { quantity: number | string };

function view(row: TradeRow): Trade {
  return { ...row, quantity: Number(row.quantity), price: Number(row.price) };
}

/** Register the trade routes. */
export async function tradeRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { db } = ctx;
  const { trades } = db.tables;
  const columns = 'id, symbol, side, quantity, price, status, created';
  const byIdempotency = `SELECT ${columns} FROM ${trades} WHERE account = ? AND idempotency_id = ?`;
  const byId = `SELECT ${columns} FROM ${trades} WHERE account = ? AND id = ?`;
  const list = `SELECT ${columns} FROM ${trades} WHERE account = ? ORDER BY seq`;
  const insert = `INSERT INTO ${trades} (id, account, idempotency_id, symbol, side, quantity, price, status, created)
     VALUES (?, ?, ?, ?, ?, ?, ?, 'executed', ?)`;

  /** After the record's retention the key may run again: only for the same trade. */
  const sameOperation = (existing: TradeRow | undefined, body: TradeBody): Trade | undefined => {
    if (existing === undefined) return undefined;
    const trade = view(existing);
    const same =
      trade.symbol === body.symbol && trade.side === body.side && trade.quantity === body.quantity && trade.price === body.price;
    if (!same) {
      throw new FingerprintMismatchError(
        `This Idempotency-Key already executed trade ${trade.id}, for a different request; use a new key.`,
      );
    }
    return trade;
  };

  const execute = async (tx: Sql, account: string, idempotencyId: string | null, body: TradeBody): Promise<Trade> => {
    if (idempotencyId !== null) {
      const existing = sameOperation(await tx.get<TradeRow>(byIdempotency, [account, idempotencyId]), body);
      if (existing) return existing;
    }
    const trade: Trade = {
      id: newId('trd'),
      symbol: body.symbol,
      side: body.side,
      quantity: body.quantity,
      price: body.price,
      status: 'executed',
      created: new Date().toISOString(),
    };
    await tx.run(insert, [trade.id, account, idempotencyId, trade.symbol, trade.side, trade.quantity, trade.price, trade.created]);
    return trade;
  };

  /** Plain mode: our own transaction; a duplicate refused by the unique index answers the row that won. */
  const executeAlone = async (account: string, idempotencyId: string | null, body: TradeBody): Promise<Trade> => {
    try {
      return await db.transaction((tx) => execute(tx, account, idempotencyId, body));
    } catch (error) {
      if (idempotencyId === null || !db.isUniqueViolation(error)) throw error;
      const existing = sameOperation(await db.get<TradeRow>(byIdempotency, [account, idempotencyId]), body);
      if (existing === undefined) throw error;
      return existing;
    }
  };

  app.post<{ Body: TradeBody }>('/execute-trade', { schema: { body: tradeBodySchema } }, async (request, reply) => {
    const run = request.idempotency;
    if (run?.signal.aborted) throw run.signal.reason;
    const account = request.account;
    const trade =
      ctx.transactional && run
        ? await execute(db.over(await run.transaction()), account, run.id, request.body)
        : await executeAlone(account, run?.id ?? null, request.body);
    await ctx.crash('trades', 'after-business-write');
    return reply.code(201).header('location', `/trades/${trade.id}`).send(trade);
  });

  app.get('/trades', async (request) => ({ data: (await db.all<TradeRow>(list, [request.account])).map(view) }));

  app.get<{ Params: { id: string } }>('/trades/:id', { schema: { params: idParams } }, async (request) => {
    const row = await db.get<TradeRow>(byId, [request.account, request.params.id]);
    if (!row) throw new ProblemError(problem('not-found', `This account has no trade ${request.params.id}.`));
    return view(row);
  });
}
