/**
 * Replicated Redis for the replication and failover tests, on loopback ports
 * of their own (never the 7000-7002 cluster other tests share): a Redis
 * Cluster of three primaries with one replica each, or a standalone primary
 * with replicas. Every server is a child process of the test (not
 * daemonized), so a test can SIGKILL one and start it again; {@link
 * ReplicatedRedis.stop} ends them all, and so does the test process exiting.
 * Leftovers of a crashed run (their config is in one of our temp dirs) are
 * shut down first; a port held by anything else fails the start.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const TEMP_PREFIX = join(tmpdir(), 'oncely-redis-replicated-');
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** One shard: its primary's port and its replicas' ports, as the cluster (or the servers) report them now. */
export interface Shard {
  readonly primary: number;
  readonly replicas: number[];
}

/** Servers started by {@link startReplicatedCluster} or {@link startReplicatedPrimary}. */
export interface ReplicatedRedis {
  /** Every port, in start order. */
  readonly ports: readonly number[];
  /** Seed nodes for a client: `{ host, port }`. */
  readonly nodes: readonly { host: string; port: number }[];
  /** Where configs and logs live. */
  readonly dir: string;
  /** Shards as they stand now (asked from a live node). */
  shards(): Promise<Shard[]>;
  /** SIGKILL the server on `port` (no shutdown, nothing saved). */
  kill(port: number): void;
  /** Start the server on `port` again with its old config (a cluster node rejoins, as a replica once failed over). */
  restart(port: number): Promise<void>;
  /** Until every slot is served, every node sees the cluster ok, and every primary has `replicas` replicas in sync. */
  settled(replicas: number, ms?: number): Promise<void>;
  /** Run redis-cli against `port`; the reply as text. */
  cli(port: number, ...args: string[]): Promise<string>;
  /** Kill every server this handle started and remove the temp dir. */
  stop(): Promise<void>;
}

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

async function waitFor(what: string, check: () => Promise<boolean>, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(100);
  }
}

/** Shut down leftovers of our own crashed runs on `ports`; refuse ports held by anyone else. */
async function clearPorts(ports: readonly number[]): Promise<void> {
  for (const port of ports) {
    if (!(await answers(port))) continue;
    const dir = (await cli(port, 'config', 'get', 'dir').catch(() => '')).split('\n')[1] ?? '';
    if (!dir.startsWith(TEMP_PREFIX)) throw new Error(`port ${port} is in use by a Redis that is not ours (dir ${dir || 'unknown'})`);
    await cli(port, 'shutdown', 'nosave').catch(() => '');
    await waitFor(`leftover redis on ${port} to stop`, async () => !(await answers(port)), 10_000);
    await rm(dir, { recursive: true, force: true });
  }
}

// Every child of every handle: killed when the test process exits, whatever happens.
const children = new Set<ChildProcess>();
let exitHook = false;
function track(child: ChildProcess): void {
  children.add(child);
  child.once('exit', () => children.delete(child));
  if (!exitHook) {
    exitHook = true;
    process.once('exit', () => {
      for (const c of children) c.kill('SIGKILL');
    });
  }
}

function parseShards(nodes: string, portOf: (address: string) => number): Shard[] {
  const primaries = new Map<string, { port: number; replicas: number[] }>();
  const replicaOf: Array<[string, number]> = [];
  for (const line of nodes.split('\n')) {
    const [id, address, flags, master, , , , link, ...slots] = line.trim().split(' ');
    if (!id || !address || !flags || flags.includes('fail') || flags.includes('noaddr') || link !== 'connected') continue;
    if (flags.includes('master') && slots.length > 0) primaries.set(id, { port: portOf(address), replicas: [] });
    else if (flags.includes('slave') && master) replicaOf.push([master, portOf(address)]);
  }
  for (const [master, port] of replicaOf) primaries.get(master)?.replicas.push(port);
  return [...primaries.values()].map(({ port, replicas }) => ({ primary: port, replicas: replicas.sort() })).sort((a, b) => a.primary - b.primary);
}

interface Started {
  dir: string;
  procs: Map<number, ChildProcess>;
  args: (port: number) => string[];
}

async function launch(ports: readonly number[], extra: (port: number, dir: string) => string[]): Promise<Started> {
  await clearPorts(ports);
  const dir = await mkdtemp(TEMP_PREFIX);
  const procs = new Map<number, ChildProcess>();
  const args = (port: number): string[] => [
    '--port', String(port),
    '--bind', '127.0.0.1',
    '--dir', dir,
    '--save', '',
    '--appendonly', 'no',
    '--daemonize', 'no',
    '--logfile', join(dir, `redis-${port}.log`),
    '--enable-debug-command', 'yes',
    // A replica that restarts syncs at once instead of waiting for company.
    '--repl-diskless-sync-delay', '0',
    ...extra(port, dir),
  ];
  const started: Started = { dir, procs, args };
  try {
    for (const port of ports) await spawnOne(started, port);
  } catch (error) {
    for (const p of procs.values()) p.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
    throw error;
  }
  return started;
}

const isLive = (p: ChildProcess | undefined): boolean => p !== undefined && p.exitCode === null && p.signalCode === null;

async function spawnOne(started: Started, port: number): Promise<void> {
  const child = spawn('redis-server', started.args(port), { stdio: 'ignore' });
  track(child);
  started.procs.set(port, child);
  await waitFor(`redis-server on ${port} (log in ${started.dir})`, () => answers(port), 10_000);
}

function handle(ports: readonly number[], started: Started, shards: () => Promise<Shard[]>, settled: ReplicatedRedis['settled']): ReplicatedRedis {
  return {
    ports,
    nodes: ports.map((port) => ({ host: '127.0.0.1', port })),
    dir: started.dir,
    shards,
    settled,
    cli,
    kill(port) {
      started.procs.get(port)?.kill('SIGKILL');
    },
    async restart(port) {
      const old = started.procs.get(port);
      if (old && isLive(old)) {
        await new Promise<void>((resolve) => old.once('exit', () => resolve()));
      }
      await spawnOne(started, port);
    },
    async stop() {
      const exits = [...started.procs.values()]
        .filter(isLive)
        .map((p) => new Promise<void>((resolve) => {
          p.once('exit', () => resolve());
          p.kill('SIGKILL');
        }));
      await Promise.all(exits);
      await rm(started.dir, { recursive: true, force: true });
    },
  };
}

/** Options of {@link startReplicatedCluster}. */
export interface ReplicatedClusterOptions {
  /** Ports of the six nodes (the cluster bus uses port + 10000). */
  ports: readonly number[];
  /** `cluster-node-timeout`: how long a silent primary takes to be failed over. Default 1000. */
  nodeTimeoutMs?: number;
}

/**
 * Start a Redis Cluster of three primaries with one replica each on
 * `ports` (six), made for failover tests: a small `cluster-node-timeout`,
 * `cluster-replica-validity-factor 0` (a replica whose link was cut still
 * takes over), `cluster-require-full-coverage no` (the other shards keep
 * serving while one fails over), no replica migration.
 *
 * @example
 * ```ts
 * const redis = await startReplicatedCluster({ ports: [7100, 7101, 7102, 7103, 7104, 7105] });
 * try { ... } finally { await redis.stop(); }
 * ```
 */
export async function startReplicatedCluster(options: ReplicatedClusterOptions): Promise<ReplicatedRedis> {
  const { ports, nodeTimeoutMs = 1_000 } = options;
  if (ports.length !== 6) throw new Error('a replicated cluster takes six ports');
  const started = await launch(ports, (port, dir) => [
    '--cluster-enabled', 'yes',
    '--cluster-config-file', join(dir, `nodes-${port}.conf`),
    '--cluster-node-timeout', String(nodeTimeoutMs),
    '--cluster-replica-validity-factor', '0',
    '--cluster-require-full-coverage', 'no',
    '--cluster-allow-replica-migration', 'no',
  ]);
  const portOf = (address: string): number => Number(address.split('@')[0]!.split(':').pop());
  const live = (): number[] => ports.filter((p) => isLive(started.procs.get(p)));
  const shards = async (): Promise<Shard[]> => {
    let last: unknown;
    for (const port of live()) {
      try {
        return parseShards(await cli(port, 'cluster', 'nodes'), portOf);
      } catch (error) {
        last = error;
      }
    }
    throw new Error(`no live node answered CLUSTER NODES: ${String(last)}`);
  };
  const settled: ReplicatedRedis['settled'] = async (replicas, ms = 30_000) => {
    await waitFor(
      `a settled cluster with ${replicas} replica(s) per primary (logs in ${started.dir})`,
      async () => {
        for (const port of live()) {
          const info = await cli(port, 'cluster', 'info');
          if (!info.includes('cluster_state:ok') || !info.includes('cluster_slots_ok:16384')) return false;
        }
        const now = await shards();
        if (now.length !== 3) return false;
        for (const shard of now) {
          if (shard.replicas.length < replicas) return false;
          const replication = await cli(shard.primary, 'info', 'replication');
          const online = replication.split('\n').filter((l) => /^slave\d+:.*state=online/.test(l)).length;
          if (online < replicas) return false;
          for (const replica of shard.replicas) {
            if (!(await cli(replica, 'info', 'replication')).includes('master_link_status:up')) return false;
          }
        }
        return true;
      },
      ms,
    );
  };
  try {
    await run(
      'redis-cli',
      ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '1', '--cluster-yes'],
      { timeout: 30_000 },
    );
    const redis = handle(ports, started, shards, settled);
    await settled(1, 40_000);
    return redis;
  } catch (error) {
    const logs = await Promise.all(ports.map((p) => readFile(join(started.dir, `redis-${p}.log`), 'utf8').catch(() => '')));
    await handle(ports, started, shards, settled).stop();
    throw new Error(`${String(error)}\n${logs.map((l) => l.split('\n').slice(-5).join('\n')).join('\n')}`);
  }
}

/**
 * Start a standalone primary on `ports[0]` with a replica on each further port.
 *
 * @example
 * ```ts
 * const redis = await startReplicatedPrimary({ ports: [7110, 7111] });
 * ```
 */
export async function startReplicatedPrimary(options: { ports: readonly number[] }): Promise<ReplicatedRedis> {
  const { ports } = options;
  const [primary, ...replicas] = ports;
  if (primary === undefined) throw new Error('at least one port');
  const started = await launch(ports, (port) => (port === primary ? [] : ['--replicaof', '127.0.0.1', String(primary)]));
  const shards = async (): Promise<Shard[]> => [{ primary, replicas: [...replicas] }];
  const settled: ReplicatedRedis['settled'] = async (wanted, ms = 20_000) => {
    await waitFor(
      `${wanted} replica(s) in sync with ${primary}`,
      async () => {
        const info = await cli(primary, 'info', 'replication');
        return info.split('\n').filter((l) => /^slave\d+:.*state=online/.test(l)).length >= wanted;
      },
      ms,
    );
  };
  const redis = handle(ports, started, shards, settled);
  try {
    await settled(replicas.length);
  } catch (error) {
    await redis.stop();
    throw error;
  }
  return redis;
}
