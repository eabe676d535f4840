/**
 * Reading the idempotency store from outside, for the chaos test's ground
 * truth: which records are in progress and who owns them, when a record
 * completed, and whether an owner's process session is still alive (the
 * store's own `sessions.alive`). One probe per store layout: PostgreSQL
 * (the `oncely_records` table of the run's own schema) and Redis (the
 * record hashes of the run's own database index).
 */
import { Redis } from 'ioredis';
import pg from 'pg';
import { postgresStore } from 'oncely/stores/postgres';
import { redisStore } from 'oncely/stores/redis';

/** One record as the store has it: in progress (with its owner session), completed, or not there. */
export interface RecordState {
  state: 'in_progress' | 'completed' | 'absent';
  owner: string | undefined;
}

/** What the chaos test reads from a store. */
export interface StoreProbe {
  /** Every record in progress now, with its owner's process session. */
  inProgress(): Promise<Map<string, string | undefined>>;
  /** The state of each of `ids`. */
  states(ids: readonly string[]): Promise<Map<string, RecordState>>;
  /** Whether a process session is alive, as the store decides it for a takeover. */
  alive(session: string): Promise<boolean>;
  /** Close the probe's own connections. */
  close(): Promise<void>;
}

/** PostgreSQL: `url` names the run's schema in its search_path, so `oncely_records` is the run's table. */
export function postgresProbe(url: string): StoreProbe {
  const pool = new pg.Pool({ connectionString: url, max: 4 });
  pool.on('error', () => {});
  const store = postgresStore({ pool });
  return {
    async inProgress() {
      const { rows } = await pool.query<{ id: string; owner: string | null }>('SELECT id, owner FROM oncely_records WHERE state = 0');
      return new Map(rows.map((row) => [row.id, row.owner ?? undefined]));
    },
    async states(ids) {
      const { rows } = await pool.query<{ id: string; state: number; owner: string | null }>(
        'SELECT id, state, owner FROM oncely_records WHERE id = ANY($1::text[])',
        [ids],
      );
      const found = new Map(rows.map((row) => [row.id, row]));
      return new Map(
        ids.map((id): [string, RecordState] => {
          const row = found.get(id);
          if (row === undefined) return [id, { state: 'absent', owner: undefined }];
          return [id, { state: row.state === 0 ? 'in_progress' : 'completed', owner: row.owner ?? undefined }];
        }),
      );
    },
    alive: (session) => store.sessions.alive(session),
    async close() {
      await store.close();
      await pool.end();
    },
  };
}

/** Redis: `url` names the run's own database index; records are `oncely:{<id>}` hashes (docs/stores/redis.md). */
export function redisProbe(url: string): StoreProbe {
  const client = new Redis(url, { lazyConnect: false, maxRetriesPerRequest: 2 });
  client.on('error', () => {});
  const store = redisStore({ client });
  const read = async (keys: readonly string[]): Promise<Array<[string | null, string | null]>> => {
    if (keys.length === 0) return [];
    const pipeline = client.pipeline();
    for (const key of keys) pipeline.hmget(key, 's', 'w');
    const answers = (await pipeline.exec()) ?? [];
    return answers.map(([error, value]) => {
      if (error) throw error;
      return value as [string | null, string | null];
    });
  };
  return {
    async inProgress() {
      const keys: string[] = [];
      let cursor = '0';
      do {
        const [next, batch] = await client.scan(cursor, 'MATCH', `${store.prefix}:{*`, 'COUNT', 1000);
        cursor = next;
        keys.push(...batch);
      } while (cursor !== '0');
      const values = await read(keys);
      const found = new Map<string, string | undefined>();
      keys.forEach((key, i) => {
        const [state, owner] = values[i]!;
        if (state === 'p') found.set(key.slice(store.prefix.length + 2, -1), owner ?? undefined);
      });
      return found;
    },
    async states(ids) {
      const values = await read(ids.map((id) => store.keyOf(id)));
      return new Map(
        ids.map((id, i): [string, RecordState] => {
          const [state, owner] = values[i]!;
          if (state === null) return [id, { state: 'absent', owner: undefined }];
          return [id, { state: state === 'p' ? 'in_progress' : 'completed', owner: owner ?? undefined }];
        }),
      );
    },
    alive: (session) => store.sessions.alive(session),
    async close() {
      await store.close();
      await client.quit().catch(() => client.disconnect());
    },
  };
}
