/**
 * Plain-text tables for the CLI and the storm demo: no dependencies, no
 * colours (output is often piped into CI logs).
 *
 * @module
 */

/** Column alignment: numbers read best right-aligned. */
export type Align = 'left' | 'right';

/**
 * Renders rows as a table with a header line and a rule under it. Cells are
 * padded to the widest cell of their column; a cell containing newlines
 * spans several lines.
 *
 * @example
 * ```ts
 * console.log(renderTable(['check', 'result'], [['replay', 'pass']]));
 * // check   result
 * // ──────  ──────
 * // replay  pass
 * ```
 */
export function renderTable(header: readonly string[], rows: readonly (readonly string[])[], align: readonly Align[] = []): string {
  const widths = header.map((h, i) =>
    Math.max(width(h), ...rows.map((row) => Math.max(0, ...(row[i] ?? '').split('\n').map(width)))),
  );
  const line = (cells: readonly string[]): string =>
    cells
      .map((cell, i) => (align[i] === 'right' ? cell.padStart(widths[i]!) : cell.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  const out = [line(header), line(widths.map((w) => '─'.repeat(w)))];
  for (const row of rows) {
    const split = header.map((_, i) => (row[i] ?? '').split('\n'));
    const height = Math.max(...split.map((lines) => lines.length));
    for (let l = 0; l < height; l++) out.push(line(split.map((lines) => lines[l] ?? '')));
  }
  return out.join('\n');
}

/** Display width, counting each code point as one column (good enough for our ASCII and box-drawing output). */
function width(text: string): number {
  return [...text].length;
}
