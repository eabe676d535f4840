/**
 * A Redis server of the benchmark's own, on a free loopback port: the Redis
 * on 6379 is shared with other work, so its CPU time and command counts say
 * little about one contestant. Here every command and every µs of Redis CPU
 * over a round belongs to the contestant under load (and a few heartbeats of
 * the idle ones). Not persisted; killed when the harness exits.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';

export interface BenchRedis {
  port: number;
  url: string;
  version: string;
  /** Redis CPU time so far (user + system), µs, from `INFO cpu`. */
  cpuUs(): Promise<number>;
  /** Commands run so far, by command (`INFO commandstats`), leaving out the ones this handle sends. */
  commands(): Promise<Record<string, number>>;
  stop(): Promise<void>;
}

/** A free TCP port on 127.0.0.1 (asked of the OS, then released). */
export async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Start a private redis-server (same persistence settings as the shared one: none). */
export async function startRedis(): Promise<BenchRedis> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'oncely-bench-redis-'));
  const child: ChildProcess = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--daemonize', 'no', '--loglevel', 'warning'],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  const kill = () => child.exitCode === null && child.kill('SIGKILL');
  process.once('exit', kill);
  const admin = new Redis({ host: '127.0.0.1', port, lazyConnect: true, retryStrategy: () => 100, maxRetriesPerRequest: null });
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      await admin.connect();
      await admin.ping();
      break;
    } catch (error) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`redis-server on ${port} did not start: ${String(error)}`);
      admin.disconnect();
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const version = /redis_version:(\S+)/.exec(await admin.info('server'))?.[1] ?? 'unknown';
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    version,
    async cpuUs() {
      const info = await admin.info('cpu');
      const field = (name: string) => Number(new RegExp(`${name}:([\\d.]+)`).exec(info)?.[1] ?? Number.NaN);
      return (field('used_cpu_user') + field('used_cpu_sys')) * 1e6;
    },
    async commands() {
      const info = await admin.info('commandstats');
      const out: Record<string, number> = {};
      for (const m of info.matchAll(/cmdstat_([\w|]+):calls=(\d+)/g)) {
        // The admin connection's own INFO calls are not a contestant's.
        if (m[1] === 'info' || m[1] === 'ping' || m[1] === 'client|list') continue;
        out[m[1]!] = Number(m[2]);
      }
      return out;
    },
    async stop() {
      admin.disconnect();
      if (child.exitCode === null) {
        const exited = once(child, 'exit');
        child.kill('SIGTERM');
        await exited;
      }
      process.removeListener('exit', kill);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
