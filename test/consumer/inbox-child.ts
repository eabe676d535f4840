/**
 * A process that dies inside an inbox transaction: it writes the handler's
 * effect, prints `written`, then waits to be killed (SIGKILL) before the
 * record's completion and COMMIT.
 */
import { writeSync } from 'node:fs';
import Database from 'better-sqlite3';
import { postgresInbox, sqliteInbox } from 'oncely/consumer/inbox';
import pg from 'pg';

interface Config {
  kind: 'pg' | 'sqlite';
  recordsTable: string;
  effects: string;
  messageId: string;
  dbPath?: string;
}
const config = JSON.parse(process.argv[2]!) as Config;

if (config.kind === 'pg') {
  const pool = new pg.Pool({ host: '127.0.0.1', user: 'postgres', database: 'test', max: 4 });
  const inbox = postgresInbox({ pool, consumer: 'crash', recordsTable: config.recordsTable });
  await inbox.handle(config.messageId, async (client) => {
    await client.query(`INSERT INTO ${config.effects} (message_id) VALUES ($1)`, [config.messageId]);
    writeSync(1, 'written\n');
    await new Promise(() => {}); // killed here, before COMMIT
  });
} else {
  const db = new Database(config.dbPath!);
  db.pragma('journal_mode = WAL');
  const inbox = sqliteInbox({ database: db, consumer: 'crash', recordsTable: config.recordsTable });
  await inbox.handle(config.messageId, async (database) => {
    database.prepare(`INSERT INTO ${config.effects} (message_id) VALUES (?)`).run(config.messageId);
    writeSync(1, 'written\n');
    await new Promise(() => {}); // killed here, inside BEGIN IMMEDIATE, before COMMIT
  });
}
