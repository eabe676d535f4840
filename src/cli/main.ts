#!/usr/bin/env node
/**
 * The `oncely` command: `verify` an endpoint from outside, `inspect` a key's
 * record in a store, `purge` expired records. See docs/cli.md.
 *
 * Exit codes: 0 success (every check passed), 1 some check failed or the
 * store could not be read, 2 usage error.
 *
 * @module
 */

import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { type EncryptionKey, encryptionKeysFromEnv } from '../stores/encryption.js';
import { formatInspection, inspectKey, openStoreUrl, purge, redact } from './inspect.js';
import { formatOpenApiReport, OPENAPI_TOOLS, verifyOpenApi } from './openapi.js';
import { renderTable } from './table.js';
import { CHECK_NAMES, type CheckName, DEFAULT_BODY, type VerifyReport, verify } from './verify.js';

/** Exit code of a usage error. */
const USAGE = 2;

class UsageError extends Error {}

const HELP = {
  main: `oncely: make retries safe

Usage: oncely <command> [options]

Commands:
  verify <url>   check from outside whether an endpoint honours Idempotency-Key
  inspect        show the record of one key in a store
  purge          delete expired records from a store

Run \`oncely <command> --help\` for a command's options.`,
  verify: `Usage: oncely verify <url> [options]
       oncely verify --openapi <file or URL> [<base-url>] [options]

Sends a bounded series of requests to <url> and reports, per check, pass or
fail with the evidence: ${CHECK_NAMES.join(', ')}.

With --openapi, runs the checks against every POST and PATCH operation of an
OpenAPI 3 document, with bodies sampled from its schemas, and reports which
operations are protected and which are not. <base-url> defaults to the
document's first server. Needs ${OPENAPI_TOOLS.parser} and ${OPENAPI_TOOLS.sampler}
in your project (oncely does not install them).

Options:
  -X, --method <m>        method [POST]
  -H, --header <h>        'Name: value', repeatable (e.g. -H 'Authorization: Bearer acct_1')
  -d, --body <template>   JSON body; {{n}} becomes the operation number and {{uuid}}
                          a fresh UUID, fixed per logical operation
                          [${DEFAULT_BODY}]
  -c, --concurrency <n>   duplicates sent at once by the concurrency check [20]
  -t, --timeout <ms>      limit of one request, ms (or 5s) [10000]
      --max-time <ms>     limit of the whole run, ms (or 90s) [120000]
      --id-field <path>   where the resource id is in a JSON answer, dotted [id];
                          else the Location header
      --skip <check>      do not run this check (repeatable)
      --openapi <doc>     check the POST and PATCH operations of this OpenAPI 3
                          document (a file or an http(s) URL) instead of one URL;
                          -X and -d do not apply, --max-time bounds the whole run
                          [120s per operation]
      --exclude <op>      with --openapi: leave out 'METHOD /path' or an
                          operationId (repeatable)
      --json              machine-readable results on stdout
  -h, --help              this help

Exit code: 0 when every check passed (every operation protected), 1 when
some failed, 2 on usage errors.`,
  inspect: `Usage: oncely inspect --key <key> [--store <url>] [options]

Shows the record oncely keeps for a key: state, fingerprint, lease, expiry,
the status and headers of the stored answer, and its body's size (the body
itself only with --show-body).

Options:
  --store <url>        sqlite:<path>, redis://…, postgres://…, mysql://…
                       [$ONCELY_STORE_URL: keeps passwords out of \`ps\`]
  --key <key>          the Idempotency-Key as the client sent it
  --scope <s>          the scope the server gave it (the account) ['']
  --namespace <n>      the middleware's namespace option ['']
  --show-body          print the head of the stored body (customer data)
  --table <name>       SQL table [oncely_records]
  --prefix <p>         Redis key prefix [the store's default]
  --json               machine-readable output
  -h, --help           this help

Environment: ONCELY_STORE_URL (the store, when --store is not given),
ONCELY_ENCRYPTION_KEY (keys that open encrypted outcomes, comma-separated
base64), ONCELY_RECORD_SECRET (the secret of keyed record ids).

The store's driver (better-sqlite3, ioredis, pg or mysql2) is loaded from
your project; oncely does not install it.`,
  purge: `Usage: oncely purge [--store <url>] [options]

Deletes expired records (stores without native TTL; Redis expires them itself).

Options:
  --store <url>        sqlite:<path>, redis://…, postgres://…, mysql://…
                       [$ONCELY_STORE_URL: keeps passwords out of \`ps\`]
  --limit <n>          most records to delete [10000]
  --table <name>       SQL table [oncely_records]
  --prefix <p>         Redis key prefix
  --json               machine-readable output
  -h, --help           this help`,
};

/** Writes where the command's output goes; replaced in tests. */
export interface Io {
  out(text: string): void;
  err(text: string): void;
}

const processIo: Io = {
  out: (text) => process.stdout.write(`${text}\n`),
  err: (text) => process.stderr.write(`${text}\n`),
};

/**
 * Runs the command line `argv` (without `node` and the script) and resolves
 * to the exit code.
 *
 * @example
 * ```ts
 * const code = await run(['verify', 'http://127.0.0.1:3000/payments', '-H', 'Authorization: Bearer a', '--json']);
 * ```
 */
export async function run(argv: readonly string[], io: Io = processIo): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'verify':
        return await runVerify(rest, io);
      case 'inspect':
        return await runInspect(rest, io);
      case 'purge':
        return await runPurge(rest, io);
      case undefined:
      case '-h':
      case '--help':
      case 'help':
        io.out(HELP.main);
        return command === undefined ? USAGE : 0;
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (error) {
    if (error instanceof UsageError || isParseArgsError(error)) {
      io.err(`oncely: ${(error as Error).message}`);
      io.err(`Run \`oncely ${command && command in HELP ? `${command} ` : ''}--help\` for usage.`);
      return USAGE;
    }
    io.err(`oncely: ${error instanceof Error ? error.message : String(error)}`);
    return 1;
  }
}

function isParseArgsError(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && code.startsWith('ERR_PARSE_ARGS');
}

function integer(value: string | undefined, name: string, min: number, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < min) throw new UsageError(`--${name} must be an integer >= ${min}, got ${JSON.stringify(value)}`);
  return n;
}

function duration(value: string | undefined, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  const match = /^(\d+(?:\.\d+)?)(ms|s)?$/.exec(value.trim());
  if (!match) throw new UsageError(`--${name} must be milliseconds (5000) or seconds (5s), got ${JSON.stringify(value)}`);
  const ms = Number(match[1]) * (match[2] === 's' ? 1000 : 1);
  if (!(ms > 0)) throw new UsageError(`--${name} must be positive`);
  return ms;
}

async function runVerify(args: readonly string[], io: Io): Promise<number> {
  const { values, positionals } = parseArgs({
    args: [...args],
    allowPositionals: true,
    options: {
      method: { type: 'string', short: 'X' },
      header: { type: 'string', short: 'H', multiple: true },
      body: { type: 'string', short: 'd' },
      concurrency: { type: 'string', short: 'c' },
      timeout: { type: 'string', short: 't' },
      'max-time': { type: 'string' },
      'id-field': { type: 'string' },
      skip: { type: 'string', multiple: true },
      openapi: { type: 'string' },
      exclude: { type: 'string', multiple: true },
      json: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    io.out(HELP.verify);
    return 0;
  }
  const openapi = values.openapi;
  if (openapi !== undefined) {
    if (positionals.length > 1) throw new UsageError('verify --openapi takes at most one base URL');
    if (values.method !== undefined || values.body !== undefined) {
      throw new UsageError('-X and -d do not apply with --openapi: methods and bodies come from the document');
    }
    if (openapi.trim() === '') throw new UsageError('--openapi needs a file or an http(s) URL');
  } else {
    if (values.exclude !== undefined) throw new UsageError('--exclude applies only with --openapi');
    if (positionals.length !== 1) throw new UsageError('verify takes exactly one URL');
  }
  const url = positionals[0];
  if (url !== undefined) {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new UsageError(`not a URL: ${JSON.stringify(url)}`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new UsageError('the URL must be http:// or https://');
  }
  const headers = (values.header ?? []).map((line): [string, string] => {
    const colon = line.indexOf(':');
    const name = colon > 0 ? line.slice(0, colon).trim() : '';
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) throw new UsageError(`--header must be 'Name: value', got ${JSON.stringify(line)}`);
    return [name, line.slice(colon + 1).trim()];
  });
  if (headers.some(([name]) => name.toLowerCase() === 'idempotency-key')) {
    throw new UsageError('do not pass Idempotency-Key: verify chooses the keys of every check');
  }
  const skip = (values.skip ?? []).map((name) => {
    if (!(CHECK_NAMES as readonly string[]).includes(name)) {
      throw new UsageError(`--skip: unknown check ${JSON.stringify(name)} (checks: ${CHECK_NAMES.join(', ')})`);
    }
    return name as CheckName;
  });
  const body = values.body;
  if (body !== undefined) {
    try {
      JSON.parse(body.replaceAll('{{n}}', '1').replaceAll('{{uuid}}', '00000000-0000-4000-8000-000000000000'));
    } catch {
      // Not JSON: allowed (form bodies…), but say so, since content-type defaults to JSON.
      io.err('oncely verify: note: the body template is not JSON once filled in; pass -H "Content-Type: …" if needed');
    }
  }
  if (openapi !== undefined) {
    const maxTime = values['max-time'];
    // A missing parser or sampler (MissingToolError) is exit 1 with its install line, like a missing driver.
    const report = await verifyOpenApi({
      document: openapi,
      ...(url !== undefined ? { baseUrl: url } : {}),
      headers,
      exclude: values.exclude ?? [],
      concurrency: integer(values.concurrency, 'concurrency', 2, 20),
      timeoutMs: duration(values.timeout, 'timeout', 10_000),
      ...(maxTime !== undefined ? { maxTimeMs: duration(maxTime, 'max-time', 120_000) } : {}),
      idField: values['id-field'] ?? 'id',
      skip,
    });
    io.out(values.json ? JSON.stringify(report, null, 2) : formatOpenApiReport(report));
    return report.passed ? 0 : 1;
  }
  const report = await verify({
    url: url!,
    method: values.method ?? 'POST',
    headers,
    ...(body !== undefined ? { body } : {}),
    concurrency: integer(values.concurrency, 'concurrency', 2, 20),
    timeoutMs: duration(values.timeout, 'timeout', 10_000),
    maxTimeMs: duration(values['max-time'], 'max-time', 120_000),
    idField: values['id-field'] ?? 'id',
    skip,
  });
  io.out(values.json ? JSON.stringify(report, null, 2) : formatReport(report));
  return report.passed ? 0 : 1;
}

/** The human-readable report: one table row per check, the evidence under its summary. */
export function formatReport(report: VerifyReport): string {
  const mark = { pass: 'PASS', fail: 'FAIL', skip: 'SKIP' } as const;
  const rows = report.checks.map((check) => [
    check.name,
    mark[check.status],
    [check.summary, ...check.evidence.map((line) => `· ${line}`)].join('\n'),
  ]);
  const passed = report.checks.filter((c) => c.status === 'pass').length;
  const ran = report.checks.filter((c) => c.status !== 'skip' || c.summary !== 'skipped on request').length;
  return [
    `oncely verify ${report.method} ${report.url}`,
    '',
    renderTable(['check', 'result', 'evidence'], rows),
    '',
    `${report.passed ? 'PASSED' : 'FAILED'}: ${passed}/${ran} checks passed · ${report.requests} requests · ${(report.durationMs / 1000).toFixed(1)} s`,
  ].join('\n');
}

function storeArgs(args: readonly string[], extra: Record<string, { type: 'string' | 'boolean' }>) {
  return parseArgs({
    args: [...args],
    allowPositionals: false,
    options: {
      store: { type: 'string' },
      table: { type: 'string' },
      prefix: { type: 'string' },
      json: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
      ...extra,
    },
  }).values as Record<string, string | boolean | undefined>;
}

/**
 * The store URL: `--store`, else `ONCELY_STORE_URL`. A password given on
 * the command line is visible to every user of the machine (`ps`), so it
 * earns a warning.
 */
function storeUrlOf(command: string, values: Record<string, string | boolean | undefined>, io: Io): string {
  if (typeof values.store === 'string') {
    if (hasPassword(values.store)) {
      io.err('warning: the password in --store is visible to other users of this machine (ps); set ONCELY_STORE_URL instead');
    }
    return values.store;
  }
  const fromEnv = process.env.ONCELY_STORE_URL;
  if (fromEnv !== undefined && fromEnv.trim() !== '') return fromEnv.trim();
  throw new UsageError(`${command} needs --store <url> or ONCELY_STORE_URL`);
}

function hasPassword(url: string): boolean {
  try {
    return new URL(url).password !== '';
  } catch {
    return false;
  }
}

async function runInspect(args: readonly string[], io: Io): Promise<number> {
  const values = storeArgs(args, {
    key: { type: 'string' },
    scope: { type: 'string' },
    namespace: { type: 'string' },
    'show-body': { type: 'boolean' },
  });
  if (values.help) {
    io.out(HELP.inspect);
    return 0;
  }
  const key = values.key;
  if (typeof key !== 'string') throw new UsageError('inspect needs --key <key>');
  const storeUrl = storeUrlOf('inspect', values, io);
  // Secrets come from the environment only, never from arguments.
  const keysText = process.env.ONCELY_ENCRYPTION_KEY;
  let encryptionKeys: EncryptionKey[] | undefined;
  try {
    encryptionKeys = keysText === undefined || keysText.trim() === '' ? undefined : encryptionKeysFromEnv(keysText);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  const secret = process.env.ONCELY_RECORD_SECRET || undefined;
  const opened = await open(storeUrl, values);
  try {
    const inspection = await inspectKey(
      opened.store,
      {
        key,
        scope: typeof values.scope === 'string' ? values.scope : '',
        namespace: typeof values.namespace === 'string' ? values.namespace : '',
      },
      {
        showBody: values['show-body'] === true,
        ...(encryptionKeys ? { encryptionKeys } : {}),
        ...(secret !== undefined ? { secret } : {}),
      },
    );
    io.out(values.json ? JSON.stringify({ store: redact(storeUrl), key, ...inspection }, null, 2) : formatInspection(inspection));
    return 0;
  } finally {
    await opened.close();
  }
}

async function runPurge(args: readonly string[], io: Io): Promise<number> {
  const values = storeArgs(args, { limit: { type: 'string' } });
  if (values.help) {
    io.out(HELP.purge);
    return 0;
  }
  const storeUrl = storeUrlOf('purge', values, io);
  const limit = integer(typeof values.limit === 'string' ? values.limit : undefined, 'limit', 1, 10_000);
  const opened = await open(storeUrl, values);
  try {
    const result = await purge(opened.store, limit);
    if (values.json) io.out(JSON.stringify({ store: redact(storeUrl), ...result }));
    else if (result.nativeTtl) io.out(`${opened.kind} expires records by itself: nothing to purge`);
    else io.out(`purged ${result.deleted} expired record(s)${result.deleted === limit ? ` (the limit; run again for more)` : ''}`);
    return 0;
  } finally {
    await opened.close();
  }
}

async function open(storeUrl: string, values: Record<string, string | boolean | undefined>) {
  if (!/^(sqlite:|redis:|rediss:|postgres:|postgresql:|mysql:|mariadb:)/.test(storeUrl)) {
    throw new UsageError(`unsupported store URL ${JSON.stringify(redact(storeUrl))}: use sqlite:<path>, redis://, postgres:// or mysql://`);
  }
  try {
    return await openStoreUrl(storeUrl, {
      ...(typeof values.table === 'string' ? { table: values.table } : {}),
      ...(typeof values.prefix === 'string' ? { prefix: values.prefix } : {}),
    });
  } catch (error) {
    throw new Error(`cannot open ${redact(storeUrl)}: ${error instanceof Error ? error.message : String(error)}`);
  }
}

/** True when this file is the program (npm's bin link is a symlink to it), not an import (tests import `run`). */
function isMain(): boolean {
  const invoked = process.argv[1];
  if (invoked === undefined) return false;
  try {
    return realpathSync(invoked) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isMain()) {
  run(process.argv.slice(2)).then(
    (code) => {
      // Exit once stdout is flushed: idle keep-alive connections to the verified server must not hold the process.
      process.stdout.write('', () => process.exit(code));
    },
    (error: unknown) => {
      console.error(error);
      process.exitCode = 1;
    },
  );
}
