// Schema changes that stay within a format version (SPEC §2): a column added on open.
import type Database from 'better-sqlite3';

/** Adds the column unless the table has it: old rows read NULL, and releases before it ignore it. */
export function addColumnIfMissing(db: Database.Database, table: string, column: string, type: string): void {
  const columns = (db.prepare(`PRAGMA table_info(${table})`).all() as Array<{ name: string }>).map((c) => c.name);
  if (!columns.includes(column)) db.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${type}`);
}
