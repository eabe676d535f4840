/** What the figures were measured on. */
import { execSync } from 'node:child_process';
import { cpus, totalmem } from 'node:os';

/** Where the stores ran, when not the shared Redis on 6379 alone. */
export interface MachineStores {
  /** Redis line, e.g. `Redis 7.0.15 on 127.0.0.1:40123, started by the benchmark`. */
  redis?: string;
  /** Other stores, one line each. */
  others?: string[];
}

export function machine(stores: MachineStores = {}): string {
  let redis = 'unknown';
  try {
    redis = /redis_version:(\S+)/.exec(execSync('redis-cli -h 127.0.0.1 INFO server', { encoding: 'utf8' }))?.[1] ?? 'unknown';
  } catch {
    // redis-cli missing: the version stays unknown.
  }
  return [
    `- CPU: ${cpus()[0]?.model ?? 'unknown'}, ${cpus().length} cores (\`nproc\`: ${execSync('nproc', { encoding: 'utf8' }).trim()})`,
    `- memory: ${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
    stores.redis
      ? `- Node.js ${process.version}, ${stores.redis}`
      : `- Node.js ${process.version}, Redis ${redis} on 127.0.0.1:6379 (shared with the load generator and the server)`,
    ...(stores.others ?? []).map((line) => `- ${line}`),
    '- load generator, server under test and stores all share these cores, over loopback',
  ].join('\n');
}
