/** Another process holding a SQLite file's write lock: how the SQLite store tests make a writer wait. */
import { type ChildProcess, spawn } from 'node:child_process';

/**
 * Start a process that opens `file`, takes its write lock (`BEGIN
 * IMMEDIATE`), and commits after `ms`. Resolves once the lock is held. The
 * child is pushed to `children`, for the caller to kill after its tests.
 */
export function holdWriteLock(file: string, ms: number, children: ChildProcess[]): Promise<ChildProcess> {
  const script = `
    const Database = require('better-sqlite3');
    const db = new Database(${JSON.stringify(file)});
    db.exec('BEGIN IMMEDIATE');
    console.log('locked');
    setTimeout(() => { db.exec('COMMIT'); console.log('released'); }, ${ms});`;
  const child = spawn(process.execPath, ['-e', script], { cwd: process.cwd(), stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  return new Promise((resolve, reject) => {
    child.stdout!.on('data', (chunk: Buffer) => {
      if (chunk.toString().includes('locked')) resolve(child);
    });
    child.on('error', reject);
  });
}
