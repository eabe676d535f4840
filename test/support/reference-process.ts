/**
 * The real reference system (`reference/main.ts`) in a child process, as a
 * user runs it, for crash and multi-process tests.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '..', '..');
const children = new Set<ChildProcess>();

/** A running reference server. */
export interface Server {
  url: string;
  child: ChildProcess;
  output: () => string;
}

/** SIGKILL every server still running (call from afterAll). */
export function killAllServers(): void {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
}

/**
 * Start `reference/main.ts` with PORT=0, SQLite files in `dir` and `env`
 * (which may name another STORE_URL, a DATABASE_URL, a FAULT…), and wait
 * for its "listening on" line.
 */
export function startServer(dir: string, env: Record<string, string>, leaseMs = 1000): Promise<Server> {
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', 'reference/main.ts'], {
    cwd: ROOT,
    env: {
      ...process.env,
      PORT: '0',
      HOST: '127.0.0.1',
      STORE_URL: `sqlite:${join(dir, 'oncely.db')}`,
      DATA_DIR: dir,
      LEASE_MS: String(leaseMs),
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  let out = '';
  const output = () => out;
  return new Promise((resolve, reject) => {
    // Generous: a cold tsx start on a loaded CI machine can take many seconds.
    const timer = setTimeout(() => reject(new Error(`server did not start in 45 s:\n${out}`)), 45_000);
    const onData = (chunk: Buffer) => {
      out += chunk.toString();
      const match = /listening on (http:\/\/\S+)/.exec(out);
      if (match) {
        clearTimeout(timer);
        resolve({ url: match[1]!, child, output });
      }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code ?? signal}) before listening:\n${out}`));
    });
  });
}

/** SIGKILL one server and wait for it to die. */
export function kill9(server: Server): Promise<void> {
  return new Promise((resolve) => {
    if (server.child.exitCode !== null || server.child.signalCode !== null) return resolve();
    server.child.once('exit', () => resolve());
    server.child.kill('SIGKILL');
  });
}

/** How a server ended: its exit code, or the signal that killed it (a FAULT hook's SIGKILL). */
export function exitOf(server: Server): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const { child } = server;
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}
