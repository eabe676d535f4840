/** Helpers shared by the consumer integration tests (real brokers, child processes). */
import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';

/** A random suffix for queue, stream and table names. */
export const suffix = (): string => randomBytes(4).toString('hex');

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Poll until `check` answers true, or fail after `timeoutMs`. */
export async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs = 10_000, what = 'condition'): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (await check()) return;
    await sleep(25);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

/** What a consumer child process is told to do (see child.ts). */
export interface ChildConfig {
  broker: 'amqp' | 'nats' | 'redis';
  /** Queue (amqp), stream (redis) or stream/durable (nats: "STREAM/durable"). */
  target: string;
  /** Shared SQLite store file, or the key prefix with `store: 'redis'`. */
  dbPath: string;
  /** The shared store. Default `sqlite`. */
  store?: 'sqlite' | 'redis';
  /** Consumer name. */
  name: string;
  /** Redis hash counting effects per message id. */
  effectsKey: string;
  leaseMs: number;
  /** A message id whose handler hangs for `slowMs` before its effect. */
  slowId?: string;
  slowMs?: number;
  /** Every handler's work time before the effect, ms. */
  workMs?: number;
}

/** A consumer child process and its stdout lines. */
export interface Child {
  proc: ChildProcessWithoutNullStreams;
  lines: string[];
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<string>;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

const childScript = fileURLToPath(new URL('./child.ts', import.meta.url));

/** Spawn `node --conditions=source --import tsx <script> <json>`. */
export function spawnNode(script: string, config: unknown): Child {
  const proc = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', script, JSON.stringify(config)], {
    cwd: fileURLToPath(new URL('../..', import.meta.url)),
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  let buffer = '';
  proc.stdout.setEncoding('utf8');
  proc.stdout.on('data', (chunk: string) => {
    buffer += chunk;
    const parts = buffer.split('\n');
    buffer = parts.pop() ?? '';
    lines.push(...parts);
  });
  let stderr = '';
  proc.stderr.setEncoding('utf8');
  proc.stderr.on('data', (chunk: string) => {
    stderr += chunk;
  });
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  return {
    proc,
    lines,
    async waitForLine(pattern, timeoutMs = 15_000) {
      const until = Date.now() + timeoutMs;
      while (Date.now() < until) {
        const line = lines.find((l) => pattern.test(l));
        if (line !== undefined) return line;
        if (proc.exitCode !== null) throw new Error(`child exited (${proc.exitCode}) before ${pattern}: ${stderr}`);
        await sleep(20);
      }
      throw new Error(`child did not print ${pattern} within ${timeoutMs} ms; stderr: ${stderr}`);
    },
    async kill(signal = 'SIGKILL') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
    },
  };
}

/** Spawn a consumer child (test/consumer/child.ts). */
export function spawnConsumer(config: ChildConfig): Child {
  return spawnNode(childScript, config);
}
