/**
 * CPU time a database spent on one server's connections, read from the
 * kernel's scheduler statistics (`/proc/…/schedstat`: ns on the CPU), so that
 * other work on the shared PostgreSQL and MariaDB does not count:
 * - PostgreSQL runs a backend process per connection: the server reports
 *   its backends' pids (`pg` gives them on connect).
 * - MariaDB runs a thread per connection (`thread_handling`
 *   one-thread-per-connection): the server reports its connection ids, and
 *   `information_schema.PROCESSLIST.TID` names their threads.
 * Both need the database on this machine, in this pid namespace; otherwise
 * the figures are missing (NaN) and only round trips are reported.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';

/** ns on the CPU of a task (`/proc/<pid>/schedstat`, first field), or NaN. */
function schedNs(path: string): number {
  try {
    return Number(readFileSync(path, 'utf8').split(' ')[0]);
  } catch {
    return Number.NaN;
  }
}

/** Snapshot: CPU ns per backend / thread. */
export type CpuSnapshot = Map<number, number>;

/** CPU µs spent between two snapshots (tasks that appeared in between count in full). */
export function cpuDeltaUs(before: CpuSnapshot, after: CpuSnapshot): number {
  let ns = 0;
  let seen = 0;
  for (const [id, v] of after) {
    if (!Number.isFinite(v)) continue;
    seen++;
    ns += v - (before.get(id) ?? 0);
  }
  return seen === 0 ? Number.NaN : ns / 1000;
}

/** CPU ns of PostgreSQL backends by pid. */
export function pgSnapshot(pids: readonly number[]): CpuSnapshot {
  return new Map(pids.map((pid) => [pid, schedNs(`/proc/${pid}/schedstat`)]));
}

interface MysqlQuery {
  query(sql: string, values?: unknown[]): Promise<[unknown, unknown]>;
}

/** Reads MariaDB connection threads' CPU; connection id → OS thread id is asked once per connection. */
export class MysqlCpu {
  readonly #admin: MysqlQuery;
  readonly #tids = new Map<number, number>();
  #pid: number | undefined;

  constructor(admin: MysqlQuery) {
    this.#admin = admin;
  }

  async #serverPid(): Promise<number | undefined> {
    if (this.#pid !== undefined) return this.#pid;
    try {
      const [rows] = await this.#admin.query('SELECT @@pid_file AS f');
      const file = (rows as Array<{ f: string }>)[0]?.f;
      if (file && existsSync(file)) this.#pid = Number(readFileSync(file, 'utf8').trim());
    } catch {
      // Not readable here: scan /proc below.
    }
    if (this.#pid === undefined) {
      for (const entry of readdirSync('/proc')) {
        if (!/^\d+$/.test(entry)) continue;
        try {
          const comm = readFileSync(`/proc/${entry}/comm`, 'utf8').trim();
          if (comm === 'mariadbd' || comm === 'mysqld') {
            this.#pid = Number(entry);
            break;
          }
        } catch {
          // Gone meanwhile.
        }
      }
    }
    return this.#pid;
  }

  async snapshot(ids: readonly number[]): Promise<CpuSnapshot> {
    const pid = await this.#serverPid();
    const missing = ids.filter((id) => !this.#tids.has(id));
    if (missing.length > 0) {
      try {
        const [rows] = await this.#admin.query(`SELECT ID AS id, TID AS tid FROM information_schema.PROCESSLIST WHERE ID IN (${missing.map(() => '?').join(',')})`, missing);
        for (const r of rows as Array<{ id: number; tid: number }>) this.#tids.set(Number(r.id), Number(r.tid));
      } catch {
        // No TID column (MySQL): no thread CPU.
      }
    }
    const out: CpuSnapshot = new Map();
    for (const id of ids) {
      const tid = this.#tids.get(id);
      out.set(id, pid === undefined || tid === undefined ? Number.NaN : schedNs(`/proc/${pid}/task/${tid}/schedstat`));
    }
    return out;
  }
}
