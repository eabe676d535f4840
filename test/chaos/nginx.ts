/**
 * NGINX (the Debian package's binary) for the chaos test: a private
 * instance on a loopback port, configured from `nginx.conf` beside this
 * file, with its pid file, logs and temp directories in a directory of the
 * test's own. Never the system service.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { accessSync, constants, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { delimiter, join } from 'node:path';

/** The nginx binary: on PATH, or where Debian puts it (/usr/sbin is not on every PATH); undefined when not installed. */
export function findNginx(): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/local/sbin'];
  for (const dir of dirs) {
    if (dir === '') continue;
    const candidate = join(dir, 'nginx');
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** A running private NGINX. */
export interface Nginx {
  /** `http://127.0.0.1:<port>` */
  url: string;
  /** The access log (format `chaos` of nginx.conf), one line per client request. */
  accessLog(): string;
  /** The error log, for failure messages. */
  errorLog(): string;
  /** Stop it (SIGTERM: a fast shutdown; then SIGKILL of the master and its worker if it lingers). Idempotent. */
  stop(): Promise<void>;
}

/** Options of {@link startNginx}. */
export interface NginxOptions {
  /** The nginx binary ({@link findNginx}). */
  binary: string;
  /** A directory of this run: NGINX's prefix, holding the rendered config, pid file, logs and temp paths. */
  dir: string;
  /** Loopback port to listen on. */
  port: number;
  /** Loopback ports of the upstream instances. */
  upstreams: readonly number[];
}

function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

function alive(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

/** The pids of `pid`'s children (its NGINX worker), from /proc. */
function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8')
      .trim()
      .split(/\s+/)
      .filter(Boolean)
      .map(Number);
  } catch {
    return [];
  }
}

/** Every NGINX started here and not stopped yet. */
const running = new Set<Nginx>();
/** Its master's pid and its worker's, for the last-resort kill at exit. */
const pids = new Map<Nginx, () => number[]>();

/** Stop every NGINX started here (afterAll). */
export async function stopAllNginx(): Promise<void> {
  await Promise.all([...running].map((nginx) => nginx.stop()));
}

// A test runner that ends the process (a test timeout, a crash) never reaches
// afterAll's stop: NGINX, a child with daemon off, would outlive it.
process.once('exit', () => {
  for (const list of pids.values()) {
    for (const pid of list()) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }
});

/** Render nginx.conf into `dir` and start NGINX on it; resolves once it accepts connections. */
export async function startNginx(options: NginxOptions): Promise<Nginx> {
  const { binary, dir, port, upstreams } = options;
  mkdirSync(dir, { recursive: true });
  const template = readFileSync(join(import.meta.dirname, 'nginx.conf'), 'utf8');
  const conf = template
    .replaceAll('{{PREFIX}}', dir)
    .replaceAll('{{PORT}}', String(port))
    .replaceAll('{{UPSTREAMS}}', upstreams.map((p) => `    server 127.0.0.1:${p} max_fails=0;`).join('\n'));
  const confPath = join(dir, 'nginx.conf');
  writeFileSync(confPath, conf);
  const errorPath = join(dir, 'error.log');
  const accessPath = join(dir, 'access.log');
  const read = (path: string): string => {
    try {
      return readFileSync(path, 'utf8');
    } catch {
      return '';
    }
  };

  // -e: the error log before the config is read, so that start-up never opens /var/log/nginx.
  const child = spawn(binary, ['-p', dir, '-c', confPath, '-e', errorPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.once('error', (error) => {
    output += String(error);
  });

  let workers: number[] = [];
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      if (!alive(child)) return;
      child.kill('SIGTERM');
      const timeout = new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), 5_000).unref());
      if ((await Promise.race([exited.then(() => 'exited' as const), timeout])) === 'timeout') {
        const lingering = [...new Set([...workers, ...childrenOf(child.pid!)])];
        child.kill('SIGKILL');
        for (const pid of lingering) {
          try {
            // Only our own NGINX worker, by its pid.
            if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('nginx: worker')) process.kill(pid, 'SIGKILL');
          } catch {
            // gone already
          }
        }
        await exited;
      }
    })();
    return stopped;
  };

  const started = Date.now();
  while (!(await portOpen(port))) {
    if (!alive(child) || Date.now() - started > 10_000) {
      await stop();
      throw new Error(`nginx did not start on 127.0.0.1:${port}:\n${output}\n${read(errorPath)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  workers = childrenOf(child.pid!);
  const nginx: Nginx = {
    url: `http://127.0.0.1:${port}`,
    accessLog: () => read(accessPath),
    errorLog: () => read(errorPath),
    stop: async () => {
      await stop();
      running.delete(nginx);
      pids.delete(nginx);
    },
  };
  running.add(nginx);
  pids.set(nginx, () => (alive(child) ? [child.pid!, ...workers] : []));
  return nginx;
}

/**
 * Requests NGINX sent to more than one instance (`proxy_next_upstream`),
 * from the access log: their `$upstream_addr` lists several addresses.
 */
export function resentRequests(accessLog: string): number {
  let resent = 0;
  for (const line of accessLog.split('\n')) {
    const match = /^\S+ \d+ "([^"]*)"/.exec(line);
    if (match?.[1]?.includes(',')) resent++;
  }
  return resent;
}

/** The statuses NGINX answered, from the access log: `201×310, 409×12, …`. */
export function nginxStatuses(accessLog: string): string {
  const counts = new Map<string, number>();
  for (const line of accessLog.split('\n')) {
    const status = /^\S+ (\d+) /.exec(line)?.[1];
    if (status !== undefined) counts.set(status, (counts.get(status) ?? 0) + 1);
  }
  return [...counts].sort(([a], [b]) => a.localeCompare(b)).map(([status, n]) => `${status}\u00d7${n}`).join(', ');
}

/** What the error log says about the upstreams: `refused×3, timed out×1, …`. */
export function upstreamErrors(errorLog: string): string {
  const kinds: Array<[string, RegExp]> = [
    ['refused', /Connection refused/],
    ['reset', /Connection reset/],
    ['closed early', /prematurely closed/],
    ['timed out', /timed out/],
    ['no live upstreams', /no live upstreams/],
  ];
  const counts = kinds.map(([name, pattern]) => [name, errorLog.split('\n').filter((line) => pattern.test(line)).length] as const);
  return counts.map(([name, n]) => `${name}\u00d7${n}`).join(', ');
}
