/** Start a server under test in its own child process and wait for the port it prints. */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';

/** Repository root (bench/lib/../..). */
export const ROOT = fileURLToPath(new URL('../../', import.meta.url));

export interface Server {
  name: string;
  url: string;
  child: ChildProcess;
  stop(): Promise<void>;
}

export interface StartOptions {
  env?: Record<string, string>;
  /** Extra node flags (e.g. `--cpu-prof`). */
  nodeFlags?: string[];
  readyTimeoutMs?: number;
  /** Directory to run in (another checkout, for before/after runs). Default: this repository. */
  cwd?: string;
}

/**
 * Run `file` (relative to the repo root) with tsx. oncely itself is loaded
 * from the compiled `dist/` (run `npm run build` first), as users run it:
 * tsx wraps every closure in a naming helper, which would charge oncely's
 * per-request closures a cost no user pays. `ONCELY_FROM=source` loads src/.
 */
export async function startServer(name: string, file: string, options: StartOptions = {}): Promise<Server> {
  const child = spawn(
    process.execPath,
    [
      ...(options.nodeFlags ?? []),
      ...(process.env.ONCELY_FROM === 'source' ? ['--conditions=source'] : []),
      '--import',
      'tsx',
      file,
    ],
    { cwd: options.cwd ?? ROOT, env: { ...process.env, PORT: '0', ...options.env }, stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${name}: no port within ${options.readyTimeoutMs ?? 20_000} ms`)), options.readyTimeoutMs ?? 20_000);
    child.stdout!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      const m = /PORT=(\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited with ${code} before it was ready`));
    });
  });
  child.stdout!.resume();
  return {
    name,
    url: `http://127.0.0.1:${port}`,
    child,
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** Stop every server, whatever happens, when the harness exits early. */
export function stopAllOnExit(servers: Server[]): void {
  const kill = () => {
    for (const s of servers) if (s.child.exitCode === null) s.child.kill('SIGKILL');
  };
  process.once('exit', kill);
  for (const signal of ['SIGINT', 'SIGTERM'] as const)
    process.once(signal, () => {
      kill();
      process.exit(130);
    });
}
