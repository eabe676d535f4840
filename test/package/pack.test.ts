/**
 * The package as a user gets it: `npm pack` (prepack builds dist/ and strips
 * the `source` condition; postpack restores the development manifest), then
 * the tarball alone, installed from a temporary npm workspace into every app
 * in examples/ and into a project of the code blocks of README.md and docs/.
 *
 * - Each example is type-checked with `skipLibCheck: false`, started (it
 *   prints `listening on <url>`), and checked by `oncely verify <url>/payments`
 *   run from the installed bin: every check must pass. Adding an example is
 *   adding a folder to examples/ (see examples/README.md).
 * - Every public entry point is type-checked with `skipLibCheck: false`, and
 *   imported and required on this Node.
 * - Every ```ts block of README.md and docs/**\/*.md is type-checked against
 *   the installed package, unless the line before it is
 *   `<!-- no-typecheck: why -->`.
 *
 * The packing runs in a staging copy of the package, never in this working
 * tree: other test files import `oncely/x` through the `source` condition of
 * this package.json while this one runs.
 *
 * One npm install serves everything (a workspace: the examples, the snippets,
 * the entry-point check), from the registry through the local npm cache.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { isBuiltin } from 'node:module';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const EXAMPLES = readdirSync(join(ROOT, 'examples'), { withFileTypes: true })
  .filter((entry) => entry.isDirectory() && existsSync(join(ROOT, 'examples', entry.name, 'package.json')))
  .map((entry) => entry.name)
  .sort();

/** The public subpaths: anything else in `exports` is an internal leaking out. */
const PUBLIC_SUBPATHS = [
  '.',
  './client',
  './consumer',
  './consumer/amqp',
  './consumer/inbox',
  './consumer/kafka',
  './consumer/nats',
  './consumer/redis-streams',
  './express',
  './fastify',
  './fetch',
  './koa',
  './lambda',
  './nestjs',
  './otel',
  './package.json',
  './stores/encryption',
  './stores/memory',
  './stores/mysql',
  './stores/postgres',
  './stores/redis',
  './stores/replay-cache',
  './stores/sqlite',
  './testing',
];

/** What the entry-point check finds without the DOM lib (a Node-only project, e.g. @tsconfig/node20): nothing. */
const KNOWN_WITHOUT_DOM: string[] = [];

const SKIP_MARKER = /^<!--\s*no-typecheck:\s*(.*?)\s*-->$/;

/**
 * Docs written before this test, whose blocks are fragments (names from the
 * surrounding prose, imports left out). Their blocks are compiled and the
 * errors printed, but they do not fail the test yet. Whoever edits one of
 * these files: make each block compile on its own or mark it
 * `<!-- no-typecheck: why -->`, then take the file off this list (the test
 * fails once a listed file is clean, so the list only shrinks).
 */
const PENDING_DOCS = ['docs/stores/redis.md'];

const MINUTE = 60_000;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** The environment of child npm and node processes: without the npm_* variables of the `npm test` running us. */
function childEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    const lower = name.toLowerCase();
    if (lower.startsWith('npm_') && !['npm_config_cache', 'npm_config_registry', 'npm_config_userconfig'].includes(lower)) continue;
    if (name === 'NODE_OPTIONS' || name === 'INIT_CWD' || name.startsWith('VITEST')) continue;
    env[name] = value;
  }
  return { ...env, NO_UPDATE_NOTIFIER: '1', npm_config_update_notifier: 'false', npm_config_fund: 'false', npm_config_audit: 'false', ...extra };
}

function run(command: string, args: readonly string[], cwd: string, timeoutMs = 5 * MINUTE): Promise<Run> {
  return new Promise((resolve) => {
    execFile(command, args, { cwd, env: childEnv(), timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === 'number' ? error.code : 1;
      resolve({ code, stdout, stderr: error?.killed ? `${stderr}\n(killed after ${timeoutMs} ms)` : stderr });
    });
  });
}

/** At most two at once: this runs on 2-core machines, beside other test files. */
function limiter(slots: number) {
  const waiting: (() => void)[] = [];
  let busy = 0;
  return async <T>(task: () => Promise<T>): Promise<T> => {
    if (busy >= slots) await new Promise<void>((resolve) => waiting.push(resolve));
    busy++;
    try {
      return await task();
    } finally {
      busy--;
      waiting.shift()?.();
    }
  };
}
const cpu = limiter(2);

function readJson(path: string): Record<string, unknown> {
  return JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
}

function writeJson(path: string, value: unknown): void {
  writeFileSync(path, `${JSON.stringify(value, null, 2)}\n`);
}

/** `tsc -p dir` with the workspace's TypeScript; its diagnostics as lines. */
async function tsc(workspace: string, dir: string): Promise<Run> {
  return cpu(() => run(process.execPath, [join(workspace, 'node_modules/typescript/bin/tsc'), '-p', dir, '--pretty', 'false'], dir));
}

/** An example's own build (`npm run build`: tsc, which type-checks). */
async function build(dir: string): Promise<Run> {
  return cpu(() => run('npm', ['run', 'build', '--silent'], dir));
}

// ---------------------------------------------------------------- snippets

interface Snippet {
  /** Markdown file, relative to the repository. */
  file: string;
  /** Line of the first code line (1-based). */
  line: number;
  code: string;
}

function markdownFiles(): string[] {
  const found = ['README.md'];
  const walk = (dir: string): void => {
    for (const entry of readdirSync(join(ROOT, dir), { withFileTypes: true })) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory()) walk(path);
      else if (entry.name.endsWith('.md')) found.push(path);
    }
  };
  walk('docs');
  return found.sort();
}

/** The ```ts blocks of the docs, and the ones skipped on purpose (with their reasons). */
function extractSnippets(): { snippets: Snippet[]; skipped: string[]; unjustified: string[] } {
  const snippets: Snippet[] = [];
  const skipped: string[] = [];
  const unjustified: string[] = [];
  for (const file of markdownFiles()) {
    const lines = readFileSync(join(ROOT, file), 'utf8').split('\n');
    for (let i = 0; i < lines.length; i++) {
      const fence = /^(\s*)(`{3,}|~{3,})\s*(\w+)?/.exec(lines[i]!);
      if (!fence) continue;
      const [, indent, marks, lang] = fence;
      let end = i + 1;
      while (end < lines.length && !lines[end]!.trimStart().startsWith(marks!)) end++;
      if (lang === 'ts' || lang === 'typescript') {
        let before = i - 1;
        while (before >= 0 && lines[before]!.trim() === '') before--;
        const marker = before >= 0 ? SKIP_MARKER.exec(lines[before]!.trim()) : null;
        if (marker) {
          if (marker[1] === '') unjustified.push(`${file}:${i + 1}`);
          skipped.push(`${file}:${i + 1}: ${marker[1]}`);
        } else {
          const code = lines
            .slice(i + 1, end)
            .map((line) => (line.startsWith(indent!) ? line.slice(indent!.length) : line))
            .join('\n');
          snippets.push({ file, line: i + 2, code });
        }
      }
      i = end;
    }
  }
  return { snippets, skipped, unjustified };
}

/** The npm package an import names (`mysql2/promise` → `mysql2`), or undefined for builtins, relative paths and oncely. */
function packageOf(specifier: string): string | undefined {
  if (specifier.startsWith('.') || specifier.startsWith('/') || isBuiltin(specifier)) return undefined;
  const parts = specifier.split('/');
  const name = specifier.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]!;
  return name === 'oncely' ? undefined : name;
}

function importsOf(code: string): string[] {
  const found = new Set<string>();
  for (const match of code.matchAll(/(?:^|\n)\s*(?:import|export)\b[^'"]*?from\s*['"]([^'"]+)['"]|import\s*\(\s*['"]([^'"]+)['"]\s*\)|(?:^|\n)\s*import\s*['"]([^'"]+)['"]/g)) {
    found.add((match[1] ?? match[2] ?? match[3])!);
  }
  return [...found];
}

// ---------------------------------------------------------------- setup

const tmp = mkdtempSync(join(tmpdir(), 'oncely-pack-'));
const staging = join(tmp, 'staging');
const workspace = join(tmp, 'workspace');
let tarball = '';
let packedFiles: string[] = [];
let publishedManifest: Record<string, unknown> = {};
let installed: Run | undefined;
const { snippets, skipped, unjustified } = extractSnippets();
const children = new Set<ChildProcess>();

/** What is needed to build and pack: the `files` of package.json, the sources, the build config, the pack script. */
function stage(): void {
  const manifest = readJson(join(ROOT, 'package.json'));
  const entries = new Set([...(manifest.files as string[]), 'package.json', 'LICENSE', 'README.md', 'src', 'tsconfig.json', 'tsconfig.build.json', 'scripts']);
  entries.delete('dist');
  mkdirSync(staging);
  for (const entry of entries) {
    if (existsSync(join(ROOT, entry))) cpSync(join(ROOT, entry), join(staging, entry), { recursive: true });
  }
  symlinkSync(join(ROOT, 'node_modules'), join(staging, 'node_modules'), 'dir');
}

/** The workspace: examples/* as they are (oncely pointed at the tarball), snippets/ and exports/ generated. */
function prepareWorkspace(): void {
  const root = readJson(join(ROOT, 'package.json'));
  const versions = root.devDependencies as Record<string, string>;
  const spec = `file:${tarball}`;
  mkdirSync(join(workspace, 'examples'), { recursive: true });
  for (const name of EXAMPLES) {
    const dir = join(workspace, 'examples', name);
    cpSync(join(ROOT, 'examples', name), dir, {
      recursive: true,
      filter: (source) => !/[/\\](node_modules|dist)([/\\]|$)/.test(relative(ROOT, source)),
    });
    const manifest = readJson(join(dir, 'package.json'));
    const deps = manifest.dependencies as Record<string, string> | undefined;
    if (deps?.oncely === undefined) throw new Error(`examples/${name}/package.json: oncely is not a dependency`);
    deps.oncely = spec;
    writeJson(join(dir, 'package.json'), manifest);
  }

  // Snippets: one module per block; their imports, at the versions this repository tests with.
  const snippetDir = join(workspace, 'snippets');
  mkdirSync(snippetDir);
  const deps: Record<string, string> = { oncely: spec, '@types/node': versions['@types/node']!, typescript: versions.typescript! };
  const missing: string[] = [];
  const files: string[] = [];
  for (const [i, snippet] of snippets.entries()) {
    for (const specifier of importsOf(snippet.code)) {
      const name = packageOf(specifier);
      if (name === undefined) continue;
      const version = versions[name];
      if (version === undefined) {
        missing.push(`${snippet.file}:${snippet.line}: ${name} (add it to devDependencies, or mark the block)`);
        continue;
      }
      // A dev alias (express4: npm:express@…) is kept as written.
      deps[name] = version;
      const types = `@types/${name.startsWith('@') ? name.slice(1).replace('/', '__') : name}`;
      if (versions[types] !== undefined) deps[types] = versions[types]!;
    }
    const fileName = `${String(i).padStart(3, '0')}-${snippet.file.replace(/[^\w]+/g, '-')}-${snippet.line}.ts`;
    files.push(fileName);
    writeFileSync(join(snippetDir, fileName), `${snippet.code}\nexport {};\n`);
  }
  if (missing.length > 0) throw new Error(`doc snippets import packages this repository does not install:\n${missing.join('\n')}`);
  writeJson(join(snippetDir, 'package.json'), { name: 'oncely-doc-snippets', private: true, type: 'module', dependencies: deps });
  writeJson(join(snippetDir, 'tsconfig.json'), {
    compilerOptions: {
      target: 'ES2022',
      module: 'NodeNext',
      moduleResolution: 'NodeNext',
      lib: ['ES2023', 'DOM', 'DOM.Iterable'],
      types: ['node'],
      strict: true,
      // One program for all blocks, for time: a block's `declare global` or
      // `declare module` augmentation is seen by the others too.
      // Third-party declarations are not ours to check; ours are, by exports/ below.
      skipLibCheck: true,
      noEmit: true,
    },
    files,
  });

  // Every public entry point, imported once, checked with skipLibCheck: false, with and without the DOM lib.
  const exportsDir = join(workspace, 'exports');
  mkdirSync(exportsDir);
  const subpaths = PUBLIC_SUBPATHS.filter((subpath) => subpath !== './package.json');
  const specifiers = subpaths.map((subpath) => (subpath === '.' ? 'oncely' : `oncely/${subpath.slice(2)}`));
  writeFileSync(
    join(exportsDir, 'index.ts'),
    `${specifiers.map((s, i) => `import * as m${i} from '${s}';`).join('\n')}\nexport const modules = [${specifiers.map((_, i) => `m${i}`).join(', ')}];\n`,
  );
  writeFileSync(join(exportsDir, 'require.cjs'), `${specifiers.map((s) => `require('${s}');`).join('\n')}\nconsole.log('required ${specifiers.length}');\n`);
  const strict = {
    target: 'ES2022',
    module: 'NodeNext',
    moduleResolution: 'NodeNext',
    types: ['node'],
    strict: true,
    skipLibCheck: false,
    noEmit: true,
  };
  writeJson(join(exportsDir, 'tsconfig.json'), { compilerOptions: { ...strict, lib: ['ES2023', 'DOM', 'DOM.Iterable'] }, files: ['index.ts'] });
  mkdirSync(join(exportsDir, 'node-only'));
  writeJson(join(exportsDir, 'node-only', 'tsconfig.json'), { compilerOptions: { ...strict, lib: ['ES2023'] }, files: ['../index.ts'] });
  writeJson(join(exportsDir, 'package.json'), {
    name: 'oncely-exports-check',
    private: true,
    type: 'module',
    // The optional peers whose types the entry points' declarations import, as a user of each front door installs them.
    dependencies: {
      oncely: spec,
      ...Object.fromEntries(
        [
          '@types/express',
          'fastify',
          'express',
          'koa',
          '@types/koa',
          '@nestjs/common',
          '@nestjs/core',
          'rxjs',
          'reflect-metadata',
          '@middy/core',
          '@types/aws-lambda',
          '@opentelemetry/api',
        ]
          .filter((name) => versions[name] !== undefined)
          .map((name) => [name, versions[name]!]),
      ),
    },
  });

  writeJson(join(workspace, 'package.json'), { name: 'oncely-pack-test', private: true, workspaces: ['examples/*', 'snippets', 'exports'] });
}

beforeAll(async () => {
  stage();
  const before = readFileSync(join(staging, 'package.json'), 'utf8');
  const packed = await run('npm', ['pack', '--json', '--pack-destination', tmp], staging);
  if (packed.code !== 0) throw new Error(`npm pack failed:\n${packed.stderr}\n${packed.stdout}`);
  const [info] = JSON.parse(packed.stdout.slice(packed.stdout.indexOf('['))) as { filename: string; files: { path: string }[] }[];
  tarball = join(tmp, info!.filename);
  packedFiles = info!.files.map((file) => file.path);
  const listing = await run('tar', ['-xzOf', tarball, 'package/package.json'], tmp);
  publishedManifest = JSON.parse(listing.stdout) as Record<string, unknown>;
  expect(readFileSync(join(staging, 'package.json'), 'utf8'), 'postpack restores the development package.json').toBe(before);
  expect(existsSync(join(staging, '.package.json.development')), 'no backup left behind').toBe(false);

  prepareWorkspace();
  installed = await run('npm', ['install', '--prefer-offline', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error'], workspace, 8 * MINUTE);
  if (installed.code !== 0) throw new Error(`npm install failed:\n${installed.stderr}`);
}, 12 * MINUTE);

afterAll(() => {
  for (const child of children) stop(child);
  rmSync(tmp, { recursive: true, force: true });
});

function stop(child: ChildProcess): void {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  try {
    process.kill(-child.pid, 'SIGKILL'); // its process group: npm and the node it started
  } catch {
    // gone already
  }
}

/** Type-checks start together (two at a time) as soon as the workspace is installed. */
const typechecks = new Map<string, Promise<Run>>();
function typecheck(dir: string): Promise<Run> {
  let pending = typechecks.get(dir);
  if (pending === undefined) {
    pending = dir.startsWith('examples/') ? build(join(workspace, dir)) : tsc(workspace, join(workspace, dir));
    typechecks.set(dir, pending);
  }
  return pending;
}
beforeAll(() => {
  for (const name of EXAMPLES) void typecheck(`examples/${name}`);
  void typecheck('exports');
  void typecheck('exports/node-only');
  void typecheck('snippets');
});

describe('the tarball', () => {
  it('ships dist/, the docs, README and LICENSE; not src/, tests or source maps', () => {
    expect(packedFiles).toEqual(expect.arrayContaining(['LICENSE', 'README.md', 'package.json', 'dist/index.js', 'dist/index.d.ts', 'dist/cli/main.js']));
    expect(packedFiles.filter((path) => path.startsWith('src/') || /\.test\.|\.map$|tsbuildinfo/.test(path))).toEqual([]);
    expect(packedFiles.filter((path) => !/^(dist|docs)\//.test(path)).sort()).toEqual(['LICENSE', 'README.md', 'package.json']);
  });

  it('publishes an explicit exports list without the source condition, every target shipped', () => {
    const exports = publishedManifest.exports as Record<string, string | Record<string, string>>;
    expect(Object.keys(exports).sort()).toEqual([...PUBLIC_SUBPATHS].sort());
    expect(JSON.stringify(exports)).not.toMatch(/"source"|\/src\/|\*/);
    for (const [subpath, target] of Object.entries(exports)) {
      const targets = typeof target === 'string' ? [target] : Object.values(target);
      for (const path of targets) expect(packedFiles, `${subpath} → ${path}`).toContain(path.replace(/^\.\//, ''));
      if (typeof target !== 'string') expect(Object.keys(target), subpath).toEqual(['types', 'default']);
    }
    expect(publishedManifest.license).toBe('MIT');
    expect(publishedManifest.engines).toEqual({ node: '^20.19.0 || >=22.12.0' });
    const bin = (publishedManifest.bin as Record<string, string>).oncely!;
    expect(packedFiles).toContain(bin.replace(/^\.\//, ''));
  });

  it('leaves the development manifest as it was: in the working tree, and in the staging copy after a pack that died half-way', async () => {
    const development = readJson(join(ROOT, 'package.json'));
    const exports = development.exports as Record<string, Record<string, string> | string>;
    expect((exports['./express'] as Record<string, string>).source).toBe('./src/express/index.ts');
    // A pack interrupted after prepack leaves the stripped manifest and the backup: the next strip heals it first.
    const before = readFileSync(join(staging, 'package.json'), 'utf8');
    const script = join(staging, 'scripts/pack-manifest.mjs');
    for (const step of ['strip', 'strip', 'restore']) {
      const result = await run(process.execPath, [script, step], staging);
      expect(result.code, result.stderr).toBe(0);
    }
    expect(readFileSync(join(staging, 'package.json'), 'utf8')).toBe(before);
    expect(existsSync(join(staging, '.package.json.development'))).toBe(false);
  });
});

/**
 * The type errors that are oncely's: in its declarations, or in the check's own file. Errors
 * inside a third-party declaration package (for example @types/koa against a newer
 * content-disposition) are that package's, and printed, not failed on.
 */
function ownErrors(output: string): string[] {
  const lines = output.split('\n').filter((line) => /error TS\d+/.test(line));
  const foreign = lines.filter((line) => /node_modules\//.test(line) && !/node_modules\/oncely\//.test(line));
  if (foreign.length > 0) console.warn(`type errors inside third-party declarations (not oncely's):\n${foreign.join('\n')}`);
  return lines.filter((line) => !foreign.includes(line));
}

describe('the installed package', () => {
  it('type-checks every public entry point with skipLibCheck: false', async () => {
    const result = await typecheck('exports');
    expect(ownErrors(result.stdout + result.stderr)).toEqual([]);
  }, 5 * MINUTE);

  it('type-checks without the DOM lib, but for the known src/client findings', async () => {
    const result = await typecheck('exports/node-only');
    const found = ownErrors(result.stdout + result.stderr)
      .map((line) => line.replace(/^.*node_modules\/oncely\/([^(]*)\(\d+,\d+\)/, '$1'));
    expect(found).toEqual(KNOWN_WITHOUT_DOM);
  }, 5 * MINUTE);

  it('is importable and require()-able on this Node, with and without --conditions=source', async () => {
    const dir = join(workspace, 'exports');
    const required = await run(process.execPath, ['require.cjs'], dir);
    expect(required.stderr).toBe('');
    expect(required.stdout.trim()).toBe(`required ${PUBLIC_SUBPATHS.length - 1}`);
    for (const flags of [[], ['--conditions=source']]) {
      const imported = await run(process.execPath, [...flags, '--input-type=module', '-e', "const m = await import('oncely/express'); console.log(typeof m.idempotency);"], dir);
      expect(imported.stderr, flags.join(' ')).toBe('');
      expect(imported.stdout.trim()).toBe('function');
    }
  });

  it('has no declared runtime dependency, and frameworks only as optional peers', () => {
    expect(publishedManifest.dependencies).toBeUndefined();
    const peers = publishedManifest.peerDependencies as Record<string, string>;
    const meta = publishedManifest.peerDependenciesMeta as Record<string, { optional?: boolean }>;
    expect(Object.keys(peers).sort()).toEqual(['@middy/core', '@nestjs/common', '@opentelemetry/api', 'express', 'fastify', 'koa']);
    for (const name of Object.keys(peers)) expect(meta[name]?.optional, name).toBe(true);
  });
});

describe.each(EXAMPLES)('examples/%s', (name) => {
  it('type-checks with skipLibCheck: false, runs, and passes every check of oncely verify (the installed bin)', async () => {
    const dir = join(workspace, 'examples', name);
    const tsconfig = readFileSync(join(dir, 'tsconfig.json'), 'utf8');
    expect(tsconfig, 'the example checks the declarations it uses').toMatch(/"skipLibCheck":\s*false/);
    const built = await typecheck(`examples/${name}`);
    expect(built.stdout + built.stderr, 'npm run build').toBe('');
    expect(built.code, 'npm run build').toBe(0);

    const child = spawn('npm', ['start', '--silent'], { cwd: dir, env: childEnv({ PORT: '0', HOST: '127.0.0.1' }), detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let output = '';
    try {
      const url = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no "listening on <url>" within 30 s:\n${output}`)), 30_000);
        const onData = (chunk: Buffer) => {
          output += chunk.toString();
          const match = /listening on (https?:\/\/\S+)/.exec(output);
          if (match) {
            clearTimeout(timer);
            resolve(match[1]!.replace(/\/$/, ''));
          }
        };
        child.stdout!.on('data', onData);
        child.stderr!.on('data', onData);
        child.once('exit', (code) => {
          clearTimeout(timer);
          reject(new Error(`the example exited (${code}) before listening:\n${output}`));
        });
      });
      const verified = await run('npx', ['--no-install', 'oncely', 'verify', `${url}/payments`, '-H', 'Authorization: Bearer acct_demo', '--json'], dir, 3 * MINUTE);
      const report = JSON.parse(verified.stdout) as { passed: boolean; checks: { name: string; status: string; summary: string; evidence: string[] }[] };
      const verdicts = report.checks.map((check) => `${check.name}: ${check.status}${check.status === 'pass' ? '' : ` (${check.summary}; ${check.evidence.join('; ')})`}`);
      expect(verdicts).toEqual(report.checks.map((check) => `${check.name}: pass`));
      expect(report.checks.map((check) => check.name)).toEqual(['missing-key', 'malformed-key', 'replay', 'reuse', 'concurrency', 'dropped-retry']);
      expect(verified.code, verified.stderr).toBe(0);
    } finally {
      stop(child);
      children.delete(child);
    }
  }, 6 * MINUTE);
});

describe('the code blocks of README.md and docs/', () => {
  it('are all type-checked, but for the few marked no-typecheck with a reason', () => {
    expect(unjustified, 'a skip marker must say why').toEqual([]);
    expect(snippets.length).toBeGreaterThan(10);
    if (skipped.length > 0) console.log(`doc blocks not type-checked:\n  ${skipped.join('\n  ')}`);
  });

  it('type-check against the installed package', async () => {
    const result = await typecheck('snippets');
    const byFile = new Map(snippets.map((snippet, i) => [`${String(i).padStart(3, '0')}-${snippet.file.replace(/[^\w]+/g, '-')}-${snippet.line}.ts`, snippet]));
    // Continuation lines (indented) belong to the diagnostic before them.
    const diagnostics = (result.stdout + result.stderr).split(/\n(?!\s)/).filter((text) => text.trim() !== '');
    const errors = diagnostics.map((text) => {
      const match = /^([^(]+)\((\d+),(\d+)\): ([\s\S]*)$/.exec(text);
      const snippet = match ? byFile.get(match[1]!) : undefined;
      return snippet ? { file: snippet.file, text: `${snippet.file}:${snippet.line + Number(match![2]) - 1}: ${match![4]}` } : { file: '', text };
    });
    const pending = errors.filter((error) => PENDING_DOCS.includes(error.file));
    if (pending.length > 0) console.warn(`doc blocks that do not compile yet (files in PENDING_DOCS):\n${pending.map((e) => e.text).join('\n')}`);
    expect(errors.filter((error) => !PENDING_DOCS.includes(error.file)).map((error) => error.text)).toEqual([]);
    const clean = PENDING_DOCS.filter((file) => !pending.some((error) => error.file === file));
    expect(clean, 'these compile now: take them off PENDING_DOCS').toEqual([]);
  }, 5 * MINUTE);
});
