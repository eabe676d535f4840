/** Keeps docs/benchmarks.md in one piece while two commands write parts of it. */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './spawn.js';

export const DOC = join(ROOT, 'docs', 'benchmarks.md');

/** Text between `<!-- name:start -->` and `<!-- name:end -->` in the doc, or null. */
export function readSection(name: string): string | null {
  if (!existsSync(DOC)) return null;
  const text = readFileSync(DOC, 'utf8');
  const start = text.indexOf(`<!-- ${name}:start -->`);
  const end = text.indexOf(`<!-- ${name}:end -->`);
  if (start < 0 || end < 0) return null;
  return text.slice(start, end + `<!-- ${name}:end -->`.length);
}

/** Wrap `body` in the markers of section `name`. */
export function section(name: string, body: string): string {
  return `<!-- ${name}:start -->\n${body.trim()}\n<!-- ${name}:end -->`;
}

/** Replace section `name` in the doc (append it when missing; create the doc when absent). */
export function writeSection(name: string, body: string, title = '# Benchmarks\n'): void {
  const block = section(name, body);
  if (!existsSync(DOC)) {
    writeFileSync(DOC, `${title}\n${block}\n`);
    return;
  }
  const text = readFileSync(DOC, 'utf8');
  const old = readSection(name);
  writeFileSync(DOC, old === null ? `${text.trimEnd()}\n\n${block}\n` : text.replace(old, block));
}
