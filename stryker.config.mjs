// Mutation testing of the lifecycle, fingerprint, HTTP core, key and store
// files with StrykerJS 9 over the unit tests: `npm run test:mutation`.
// How to run one file, the scores and the explained survivors: docs/mutation.md.
import { readFileSync } from 'node:fs';

const FILES = [
  'src/engine/engine.ts',
  'src/engine/idempotent.ts',
  'src/http/core.ts',
  'src/engine/fingerprint.ts',
  'src/http/outcome.ts',
  'src/stores/sqlite.ts',
  'src/stores/memory.ts',
  'src/engine/key.ts',
];

// Stryker 9 places a mutant of a labelled loop (`walk: for (;;)` in
// canonicalJson) as `walk: if (...) { for ... }`, and every `continue walk`
// becomes a SyntaxError that silently drops all test files importing the
// module. So the line holding such a label is left out of the mutated
// ranges; the lines inside the loop are still mutated. Lost: the loop's own
// `for (;false;)` and the enclosing function's empty-body mutant.
// `ONCELY_MUTATE=src/http/outcome.ts npm run test:mutation` (comma-separated
// parts of paths) mutates only those files, with their own report directory
// and incremental file. Use it rather than `--mutate`, which would lose the
// ranges below.
const only = process.env.ONCELY_MUTATE?.split(',').map((part) => part.trim()).filter(Boolean);
const selected = only ? FILES.filter((file) => only.some((part) => file.includes(part))) : FILES;
if (selected.length === 0) throw new Error(`ONCELY_MUTATE=${process.env.ONCELY_MUTATE} matches none of ${FILES.join(', ')}`);
// `ONCELY_MUTATE_LINES='src/engine/engine.ts:576,620;src/http/core.ts:368'` mutates only those lines
// (to run a first run's survivors again, usually with ONCELY_COVERAGE=all), reported under
// reports/mutation/lines-<files>/.
const lineSelection = process.env.ONCELY_MUTATE_LINES?.split(';')
  .map((part) => part.trim())
  .filter(Boolean)
  .map((part) => {
    const [file, list] = part.split(':');
    if (!FILES.includes(file) || !list) throw new Error(`ONCELY_MUTATE_LINES: ${part} is not <one of ${FILES.join(', ')}>:<line>,<line>…`);
    return { file, lines: list.split(',').map(Number) };
  });
const reports = lineSelection
  ? `reports/mutation/lines-${lineSelection.map(({ file }) => file.split('/').pop()).join('+')}`
  : only
    ? `reports/mutation/${only.join('+').replace(/[^\w.+-]+/g, '_')}`
    : 'reports/mutation';

function mutateRanges(file) {
  const lines = readFileSync(file, 'utf8').split('\n');
  const labelled = lines.flatMap((line, i) => (/^\s*[A-Za-z_$][\w$]*:\s*(for|while|do)\b/.test(line) ? [i + 1] : []));
  if (labelled.length === 0) return [file];
  const ranges = [];
  let from = 1;
  for (const line of labelled) {
    if (line > from) ranges.push(`${file}:${from}-${line - 1}`);
    from = line + 1;
  }
  ranges.push(`${file}:${from}-${lines.length}`);
  return ranges;
}

/** @type {import('@stryker-mutator/api/core').PartialStrykerOptions} */
export default {
  testRunner: 'vitest',
  // Only the unit tests (src/**/*.test.ts), with the `source` export condition.
  vitest: { configFile: 'vitest.mutation.config.ts', related: true },
  // perTest: each mutant runs only against the tests seen executing it. Code reached from timers
  // (renewals, deadlines, heartbeats on vitest's fake clock) can be credited to the wrong test, so a
  // mutant those tests kill may be reported as survived: ONCELY_COVERAGE=all runs every related test
  // for each mutant (slow: use it with ONCELY_MUTATE_LINES on the survivors).
  coverageAnalysis: process.env.ONCELY_COVERAGE === 'all' ? 'all' : 'perTest',
  // A mutant of module-level code (a constant, a regex) can only be tested by
  // reloading every test of its file's importers: 40 s or more each here, and
  // the lion's share of a run. They are left out (reported as Ignored) unless
  // ONCELY_MUTATE_STATIC=1. Mutants reached both at load and by tests still run,
  // against the tests that reach them.
  // (Stryker refuses ignoreStatic with coverageAnalysis 'all'.)
  ignoreStatic: process.env.ONCELY_MUTATE_STATIC !== '1' && process.env.ONCELY_COVERAGE !== 'all',
  mutate: lineSelection
    ? lineSelection.flatMap(({ file, lines }) => lines.map((line) => `${file}:${line}-${line}`))
    : selected.flatMap(mutateRanges),
  // Two shared cores: one test runner by default (`--concurrency 2` on a free machine).
  concurrency: 1,
  // Lease and deadline tests sleep for real: a loaded machine must not turn slowness into timeouts.
  timeoutMS: 10_000,
  timeoutFactor: 2,
  dryRunTimeoutMinutes: 10,
  // Reruns only the mutants whose code or covering tests changed (`--force` for a full run).
  incremental: true,
  incrementalFile: `${reports}/stryker-incremental.json`,
  reporters: ['clear-text', 'progress', 'html', 'json'],
  htmlReporter: { fileName: `${reports}/mutation.html` },
  jsonReporter: { fileName: `${reports}/mutation.json` },
  clearTextReporter: { allowEmojis: false, logTests: false, reportScoreTable: true },
  thresholds: { high: 90, low: 80, break: null },
  tempDirName: '.stryker-tmp',
  // Not needed by the unit tests (src/cli/verify.test.ts does use reference/ and test/support/).
  ignorePatterns: ['bench', 'examples', 'docs', 'dist', 'data', '.tmp', 'reports', '.stryker-tmp', '*.log'],
};
