/**
 * A real three-master Redis Cluster on 127.0.0.1:7000-7002 for integration
 * tests, started on demand from `redis-server` and `redis-cli`.
 *
 * Several test files (several processes) may use it at once, so starting and
 * stopping hold a lock, and each user registers itself: the cluster is
 * reused when it is already healthy, and shut down only by the last user of
 * a cluster this helper started. A cluster started by someone else (its
 * config file is not in one of our temp dirs) is never stopped.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, rmdir, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** The loopback ports of the three masters. */
export const REDIS_CLUSTER_PORTS = [7000, 7001, 7002] as const;
/** Seed nodes for a cluster client (ioredis `Cluster` or node-redis `createCluster` `rootNodes`). */
export const REDIS_CLUSTER_NODES = REDIS_CLUSTER_PORTS.map((port) => ({ host: '127.0.0.1', port }));

/** What {@link startRedisCluster} found or did. */
export interface RedisClusterHandle {
  /** Seed nodes, `{ host, port }`. */
  readonly nodes: readonly { host: string; port: number }[];
  /** True when this call started the servers; false when it reused a healthy cluster. */
  readonly started: boolean;
}

const TEMP_PREFIX = join(tmpdir(), 'oncely-redis-cluster-');
const LOCK = join(tmpdir(), 'oncely-redis-cluster.lock');
const USERS = join(tmpdir(), 'oncely-redis-cluster.users');
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

let registration: string | undefined;

async function cli(port: number, ...args: string[]): Promise<string> {
  const { stdout } = await run('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args], { timeout: 10_000 });
  return stdout.trim();
}

async function answers(port: number): Promise<boolean> {
  try {
    return (await cli(port, 'ping')) === 'PONG';
  } catch {
    return false;
  }
}

async function healthy(port: number): Promise<boolean> {
  try {
    const info = await cli(port, 'cluster', 'info');
    return (
      info.includes('cluster_state:ok') &&
      info.includes('cluster_slots_assigned:16384') &&
      /cluster_known_nodes:(\d+)/.exec(info)?.[1] === String(REDIS_CLUSTER_PORTS.length)
    );
  } catch {
    return false;
  }
}

/** The temp dir of a node this helper started, or undefined for someone else's node. */
async function ourDir(port: number): Promise<string | undefined> {
  try {
    const reply = (await cli(port, 'config', 'get', 'cluster-config-file')).split('\n');
    const file = reply[1] ?? '';
    if (!file.startsWith(TEMP_PREFIX)) return undefined;
    return file.slice(0, file.lastIndexOf('/'));
  } catch {
    return undefined;
  }
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
};

/** A cross-process mutex: mkdir is atomic. A lock whose holder died is broken. */
async function withLock<T>(body: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + 55_000;
  for (;;) {
    try {
      await mkdir(LOCK);
      await writeFile(join(LOCK, 'pid'), String(process.pid));
      break;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      const holder = Number(await readFile(join(LOCK, 'pid'), 'utf8').catch(() => 'NaN'));
      const age = Date.now() - ((await stat(LOCK).catch(() => undefined))?.mtimeMs ?? Date.now());
      if ((Number.isInteger(holder) && !alive(holder)) || age > 120_000) {
        await rm(LOCK, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new Error(`redis cluster lock ${LOCK} held by pid ${holder}`);
      await sleep(100);
    }
  }
  try {
    return await body();
  } finally {
    await rm(LOCK, { recursive: true, force: true });
  }
}

/** Live users of the cluster; entries of dead processes are removed. */
async function users(): Promise<string[]> {
  await mkdir(USERS, { recursive: true });
  const live: string[] = [];
  for (const entry of await readdir(USERS)) {
    const pid = Number(entry.split('-')[0]);
    if (alive(pid)) live.push(entry);
    else await unlink(join(USERS, entry)).catch(() => {});
  }
  return live;
}

async function shutdown(ports: readonly number[]): Promise<void> {
  await Promise.all(ports.map((port) => cli(port, 'shutdown', 'nosave').catch(() => '')));
  const deadline = Date.now() + 10_000;
  for (const port of ports) {
    while (await answers(port)) {
      if (Date.now() > deadline) throw new Error(`redis on port ${port} did not shut down`);
      await sleep(50);
    }
  }
}

async function waitFor(what: string, check: () => Promise<boolean>, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

async function start(): Promise<void> {
  const dir = await mkdtemp(TEMP_PREFIX);
  for (const port of REDIS_CLUSTER_PORTS) {
    await run('redis-server', [
      '--port', String(port),
      '--bind', '127.0.0.1',
      '--cluster-enabled', 'yes',
      '--cluster-config-file', join(dir, `nodes-${port}.conf`),
      '--dir', dir,
      '--save', '',
      '--appendonly', 'no',
      '--daemonize', 'yes',
      '--pidfile', join(dir, `redis-${port}.pid`),
      '--logfile', join(dir, `redis-${port}.log`),
    ]);
  }
  for (const port of REDIS_CLUSTER_PORTS) {
    await waitFor(`redis-server on port ${port} (log in ${dir})`, () => answers(port), 10_000);
  }
  await run(
    'redis-cli',
    [
      '--cluster', 'create',
      ...REDIS_CLUSTER_PORTS.map((port) => `127.0.0.1:${port}`),
      '--cluster-replicas', '0',
      '--cluster-yes',
    ],
    { timeout: 30_000 },
  );
  for (const port of REDIS_CLUSTER_PORTS) {
    await waitFor(`cluster_state:ok on port ${port}`, () => healthy(port), 30_000);
  }
}

/**
 * Make sure a healthy three-master cluster runs on 127.0.0.1:7000-7002:
 * reuse one that is already up, or start one in a temp dir. Call it from
 * `beforeAll` (it takes a few seconds) and {@link stopRedisCluster} from `afterAll`.
 *
 * @example
 * ```ts
 * beforeAll(async () => { await startRedisCluster(); });
 * afterAll(async () => { await stopRedisCluster(); });
 * ```
 * @throws when a port is held by something that is not our cluster, or the cluster does not form.
 */
export async function startRedisCluster(): Promise<RedisClusterHandle> {
  return withLock(async () => {
    let started = false;
    const states = await Promise.all(REDIS_CLUSTER_PORTS.map(healthy));
    if (!states.every(Boolean)) {
      // Leftovers of ours (a crashed run) are replaced; anything else is not ours to touch.
      const busy = [];
      for (const port of REDIS_CLUSTER_PORTS) if (await answers(port)) busy.push(port);
      const dirs = await Promise.all(busy.map(ourDir));
      const foreign = busy.filter((_, i) => dirs[i] === undefined);
      if (foreign.length > 0) {
        throw new Error(`ports ${foreign.join(', ')} are in use by a Redis that is not a healthy cluster`);
      }
      await shutdown(busy);
      for (const dir of new Set(dirs)) if (dir) await rm(dir, { recursive: true, force: true });
      await start();
      started = true;
    }
    await users();
    registration = `${process.pid}-${randomBytes(4).toString('hex')}`;
    await writeFile(join(USERS, registration), '');
    return { nodes: REDIS_CLUSTER_NODES, started };
  });
}

/**
 * Unregister from the cluster; the last user of a cluster this helper
 * started shuts its servers down (`shutdown nosave`) and removes its temp
 * dir. A cluster someone else started keeps running.
 *
 * @example
 * ```ts
 * afterAll(async () => { await stopRedisCluster(); });
 * ```
 */
export async function stopRedisCluster(): Promise<void> {
  if (registration === undefined) return;
  const me = registration;
  registration = undefined;
  await withLock(async () => {
    await unlink(join(USERS, me)).catch(() => {});
    if ((await users()).length > 0) return;
    const dirs = await Promise.all(REDIS_CLUSTER_PORTS.map(ourDir));
    const ours = REDIS_CLUSTER_PORTS.filter((_, i) => dirs[i] !== undefined);
    await shutdown(ours);
    for (const dir of new Set(dirs)) if (dir) await rm(dir, { recursive: true, force: true });
    await rmdir(USERS).catch(() => {});
  });
}
