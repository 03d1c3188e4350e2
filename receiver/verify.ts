// `tidemark-receiver verify` (docs/SPEC.md §5.3): checks the stored data
// without the key — every pack file's header and catalogued size, every
// catalogued chunk's pack entry (magic, length, id, checksum of the envelope,
// envelope shape) and the catalog itself — and names, for each damaged
// object, the committed points whose restore it breaks.
//
// Safe beside a running `serve` or `prune`: the catalog is opened read-only
// and read in one snapshot (WAL); packs are read only up to what that
// snapshot catalogues. A pack file that disappears because a concurrent prune
// compacted it away is skipped, not reported.
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { CHUNK_OVERHEAD_BYTES, checkEnvelopeShape } from '../shared/chunk-crypto.js';
import { TidemarkError } from '../shared/errors.js';
import { printJson, printable } from '../shared/cli-util.js';
import { Progress, ProgressReporter } from '../shared/progress.js';
import { MAX_BLOCK_BYTES } from '../shared/protocol.js';
import { formatBytes } from '../shared/units.js';
import { CATALOG_VERSION } from './catalog.js';
import type { DataDir } from './data-dir.js';
import { ENTRY_HEADER_BYTES, ENTRY_MAGIC, LEGACY_ENTRY_MAGIC, LEGACY_PACK_VERSION, PACK_HEADER_BYTES, PACK_MAGIC, PACK_VERSION, expectedEntryHeader } from './pack-store.js';

/** Pack files are read sequentially in windows of this size. */
const READ_WINDOW_BYTES = 16 * 1024 * 1024;
/** At most this many problems are taken from PRAGMA integrity_check. */
const MAX_INTEGRITY_MESSAGES = 100;

export interface AffectedPoint {
  host: string;
  pointId: number;
  disk: string;
}

export interface Damage {
  /** pack: a pack file (missing, unreadable, bad header, short); chunk: one entry; catalog: the database. */
  kind: 'pack' | 'chunk' | 'catalog';
  /** Pack file, relative to DATA/packs. */
  pack: string | null;
  /** Byte offset in the pack file: the entry's start for a chunk, the file's actual size for a short pack. */
  offset: number | null;
  chunkId: string | null;
  message: string;
  /** Committed points whose restore reads the damaged data, by host, point and disk. */
  affectedPoints: AffectedPoint[];
}

export interface ReceiverVerifyReport {
  ok: boolean;
  packsChecked: number;
  chunksChecked: number;
  /** Bytes of pack entries (headers and envelopes) read and checked. */
  bytesChecked: number;
  damaged: Damage[];
}

interface PackRow {
  id: number;
  vaultId: string;
  file: string;
  sizeBytes: number;
}

interface ChunkRow {
  /** null when the chunk's vault number is not in vault_number (a damaged catalog). */
  vaultId: string | null;
  id: Buffer;
  packId: number;
  offset: number;
  length: number;
}

/** A damage record plus what is needed to find the points it affects (not printed). */
interface Finding extends Damage {
  vaultId: string | null;
  /** For a pack: the findings of its chunks, whose points the pack's record lists too. */
  chunks?: Finding[];
}

/** Reads one pack file front to back through a large window; entries are served from it. */
class PackReader {
  private window = Buffer.allocUnsafe(READ_WINDOW_BYTES);
  private windowStart = 0;
  private windowBytes = 0;

  constructor(
    readonly fd: number,
    readonly fileBytes: number,
  ) {}

  /** The bytes [offset, offset + length), or fewer where the file ends. Valid until the next call. */
  read(offset: number, length: number): Buffer {
    if (offset >= this.windowStart && offset + length <= this.windowStart + this.windowBytes) {
      return this.window.subarray(offset - this.windowStart, offset - this.windowStart + length);
    }
    if (length > this.window.length) this.window = Buffer.allocUnsafe(length);
    this.windowBytes = 0;
    let got: number;
    try {
      got = this.readInto(this.window, offset, Math.min(this.window.length, this.fileBytes - offset));
    } catch {
      // An unreadable sector somewhere in the window: read just this entry, so only it is reported.
      const entry = Buffer.allocUnsafe(length);
      return entry.subarray(0, this.readInto(entry, offset, Math.min(length, this.fileBytes - offset)));
    }
    this.windowStart = offset;
    this.windowBytes = got;
    return this.window.subarray(0, Math.min(got, length));
  }

  private readInto(buffer: Buffer, offset: number, want: number): number {
    let got = 0;
    while (got < want) {
      const n = readSync(this.fd, buffer, got, want - got, offset + got);
      if (n === 0) break;
      got += n;
    }
    return got;
  }
}

function openReadOnly(path: string): Database.Database {
  let db: Database.Database;
  try {
    db = new Database(path, { readonly: true, fileMustExist: true });
  } catch (err) {
    throw new TidemarkError('E_STORAGE', `cannot open catalog ${path}: ${(err as Error).message}`, { cause: err, retryable: false });
  }
  db.pragma('busy_timeout = 5000');
  return db;
}

/** Differences between a stored entry header and the one the catalog expects. */
function headerProblems(stored: Buffer, expected: Buffer, catalogLength: number): string[] {
  const problems: string[] = [];
  const magic = stored.subarray(0, 4);
  if (!magic.equals(ENTRY_MAGIC) && !magic.equals(LEGACY_ENTRY_MAGIC)) {
    problems.push(`entry magic is ${JSON.stringify(magic.toString('latin1'))}, not "${ENTRY_MAGIC}" (or "${LEGACY_ENTRY_MAGIC}" of a version 1 pack)`);
  }
  const length = stored.readUInt32BE(4);
  if (length !== catalogLength) problems.push(`entry length is ${length}, the catalog says ${catalogLength}`);
  if (!stored.subarray(8, 40).equals(expected.subarray(8, 40))) problems.push(`entry names chunk ${stored.subarray(8, 40).toString('hex')}`);
  if (!stored.subarray(40, 56).equals(expected.subarray(40, 56))) problems.push('checksum mismatch (the envelope or its stored checksum changed)');
  return problems;
}

export function verifyDataDir(dir: DataDir): ReceiverVerifyReport {
  const db = openReadOnly(dir.catalogPath);
  const report: ReceiverVerifyReport = { ok: false, packsChecked: 0, chunksChecked: 0, bytesChecked: 0, damaged: [] };
  const findings: Finding[] = [];
  try {
    const version = db.prepare(`SELECT value FROM meta WHERE key = 'catalog_version'`).pluck().get() as string | undefined;
    if (version === '1') {
      // Read-only here; serve and prune upgrade it (SPEC §2).
      throw new TidemarkError('E_STORAGE', `catalog ${dir.catalogPath} is version 1, from an earlier release; start tidemark-receiver serve (or run prune) once to upgrade it, then verify`, { retryable: false });
    }
    if (Number(version) !== CATALOG_VERSION) {
      throw new TidemarkError('E_STORAGE', `catalog ${dir.catalogPath} has format version ${version ?? 'none'}; this receiver reads version ${CATALOG_VERSION}`, { retryable: false });
    }
    // Scratch space for the affected-points query; the temp schema is writable on a read-only connection.
    db.exec(`CREATE TEMP TABLE verify_damaged (vault_id TEXT NOT NULL, id BLOB NOT NULL, PRIMARY KEY (vault_id, id)) WITHOUT ROWID`);
    db.exec('BEGIN'); // one snapshot for everything below
    try {
      checkCatalog(db, findings);
      checkPacks(db, dir.packDir, dir.catalogPath, report, findings);
      checkReferences(db, findings);
      addAffectedPoints(db, findings);
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      if (typeof code !== 'string' || !code.startsWith('SQLITE_')) throw err;
      // A catalog too damaged to query: report what was found so far and this.
      findings.push({ kind: 'catalog', pack: null, offset: null, chunkId: null, vaultId: null, message: `catalog could not be read: ${(err as Error).message}`, affectedPoints: [] });
    } finally {
      if (db.inTransaction) db.exec('COMMIT');
    }
  } finally {
    db.close();
  }
  report.damaged = findings.map(({ kind, pack, offset, chunkId, message, affectedPoints }) => ({ kind, pack, offset, chunkId, message, affectedPoints }));
  report.ok = report.damaged.length === 0;
  return report;
}

function checkCatalog(db: Database.Database, findings: Finding[]): void {
  const messages = db.pragma(`integrity_check(${MAX_INTEGRITY_MESSAGES})`, { simple: false }) as Array<{ integrity_check: string }>;
  for (const { integrity_check: message } of messages) {
    if (message !== 'ok') findings.push({ kind: 'catalog', pack: null, offset: null, chunkId: null, vaultId: null, message: `catalog integrity_check: ${message}`, affectedPoints: [] });
  }
  for (const row of db.pragma('foreign_key_check') as Array<{ table: string; rowid: number | null; parent: string }>) {
    findings.push({ kind: 'catalog', pack: null, offset: null, chunkId: null, vaultId: null, message: `catalog table ${row.table} row ${row.rowid} references a missing ${row.parent}`, affectedPoints: [] });
  }
}

interface OpenedPack {
  row: PackRow;
  reader: PackReader | null;
  /** Set when the file cannot be read at all: every chunk in it is damaged. */
  unreadable: Finding | null;
  /** Set when the file is shorter than catalogued: entries past its end are damaged. */
  short: Finding | null;
  /** Gone because a concurrent prune compacted it after our snapshot. */
  skip: boolean;
}

/** Every pack and every catalogued entry, in pack and offset order: one open and sequential reads per pack. */
function checkPacks(db: Database.Database, packDir: string, catalogPath: string, report: ReceiverVerifyReport, findings: Finding[]): void {
  const packs = db.prepare(`SELECT id, vault_id AS vaultId, file, size_bytes AS sizeBytes FROM pack ORDER BY id`).all() as PackRow[];
  const total = db.prepare(`SELECT COUNT(*) AS chunks, COALESCE(SUM(length), 0) AS bytes FROM chunk`).get() as { chunks: number; bytes: number };
  const progress = new Progress('verify', total.bytes + total.chunks * ENTRY_HEADER_BYTES);
  const reporter = new ProgressReporter(false); // stderr on a TTY only: stdout carries the report
  const packById = new Map(packs.map((p) => [p.id, p]));
  let nextPack = 0; // index into packs of the first pack not yet opened
  let current: OpenedPack | null = null;

  const openPack = (row: PackRow): OpenedPack => {
    if (current?.reader) closeSync(current.reader.fd);
    const pack: OpenedPack = { row, reader: null, unreadable: null, short: null, skip: false };
    const packFinding = (message: string, offset: number | null): Finding => {
      const finding: Finding = { kind: 'pack', pack: row.file, offset, chunkId: null, vaultId: row.vaultId, message, affectedPoints: [], chunks: [] };
      findings.push(finding);
      return finding;
    };
    let fd: number;
    try {
      fd = openSync(join(packDir, row.file), 'r');
    } catch (err) {
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      if (missing && packGoneSinceSnapshot(catalogPath, row.id)) {
        pack.skip = true;
        return pack;
      }
      report.packsChecked++;
      pack.unreadable = packFinding(missing ? `pack file ${row.file} is missing` : `pack file ${row.file} cannot be opened: ${(err as Error).message}`, null);
      return pack;
    }
    report.packsChecked++;
    const fileBytes = fstatSync(fd).size;
    pack.reader = new PackReader(fd, fileBytes);
    const header = pack.reader.read(0, PACK_HEADER_BYTES);
    const knownVersion = header[4] === PACK_VERSION || header[4] === LEGACY_PACK_VERSION;
    if (header.length < PACK_HEADER_BYTES || !header.subarray(0, 4).equals(PACK_MAGIC) || !knownVersion) {
      packFinding(`pack ${row.file}: header is not ${PACK_MAGIC.toString()} version ${PACK_VERSION} or ${LEGACY_PACK_VERSION} (found ${JSON.stringify(header.subarray(0, 4).toString('latin1'))} ` +
        `version ${header[4] ?? 'none'}); its entries are checked one by one`, 0);
    }
    if (fileBytes < row.sizeBytes) pack.short = packFinding(`pack ${row.file}: the file is ${fileBytes} bytes, shorter than the ${row.sizeBytes} bytes catalogued`, fileBytes);
    return pack;
  };

  // LEFT JOIN: a chunk whose vault number is not listed is still checked (foreign_key_check reports the number).
  const chunks = db.prepare(`
    SELECT n.vault_id AS vaultId, c.id, c.pack_id AS packId, c.offset, c.length FROM chunk c LEFT JOIN vault_number n ON n.number = c.vault
    ORDER BY c.pack_id, c.offset`);
  for (const chunk of chunks.iterate() as IterableIterator<ChunkRow>) {
    const idHex = chunk.id.toString('hex');
    const row = packById.get(chunk.packId);
    report.chunksChecked++;
    if (!row) {
      findings.push({ kind: 'catalog', pack: null, offset: chunk.offset, chunkId: idHex, vaultId: chunk.vaultId, message: `chunk ${idHex} is located in pack ${chunk.packId}, which the catalog does not list`, affectedPoints: [] });
      continue;
    }
    if (current?.row.id !== row.id) {
      // Packs without any catalogued chunk are opened too, for their header.
      while (packs[nextPack]!.id < row.id) current = openPack(packs[nextPack++]!);
      current = openPack(packs[nextPack++]!);
    }
    const pack: OpenedPack = current;
    if (pack.skip) {
      report.chunksChecked--;
      continue;
    }
    const chunkFinding = (message: string, packFinding: Finding | null = null) => {
      const finding: Finding = { kind: 'chunk', pack: row.file, offset: chunk.offset, chunkId: idHex, vaultId: chunk.vaultId, message: `chunk ${idHex} in pack ${row.file} at offset ${chunk.offset}: ${message}`, affectedPoints: [] };
      findings.push(finding);
      packFinding?.chunks!.push(finding);
    };
    if (!pack.reader) {
      chunkFinding(pack.unreadable!.message, pack.unreadable);
      continue;
    }
    if (chunk.length < CHUNK_OVERHEAD_BYTES || chunk.length > MAX_BLOCK_BYTES + CHUNK_OVERHEAD_BYTES) {
      chunkFinding(`the catalogued envelope length ${chunk.length} is outside the legal size`);
      continue;
    }
    const entryBytes = ENTRY_HEADER_BYTES + chunk.length;
    let entry: Buffer;
    try {
      entry = pack.reader.read(chunk.offset, entryBytes);
    } catch (err) {
      chunkFinding(`cannot be read: ${(err as Error).message}`);
      continue;
    }
    report.bytesChecked += entry.length;
    progress.add(entryBytes);
    reporter.report(progress);
    if (entry.length < entryBytes) {
      chunkFinding(`the entry (${entryBytes} bytes) extends past the end of the pack file (${pack.reader.fileBytes} bytes)`, pack.short);
      continue;
    }
    const envelope = entry.subarray(ENTRY_HEADER_BYTES);
    const stored = entry.subarray(0, ENTRY_HEADER_BYTES);
    const problems = headerProblems(stored, expectedEntryHeader(stored, chunk.id, envelope), chunk.length);
    try {
      checkEnvelopeShape(envelope, MAX_BLOCK_BYTES);
    } catch (err) {
      problems.push((err as Error).message);
    }
    if (problems.length > 0) chunkFinding(problems.join('; '));
  }
  while (nextPack < packs.length) current = openPack(packs[nextPack++]!);
  if (current?.reader) closeSync(current.reader.fd);
  reporter.report(progress, true);
  reporter.done();
}

/** Whether a pack row present in our snapshot is gone in the catalog's current state. */
function packGoneSinceSnapshot(catalogPath: string, packId: number): boolean {
  const fresh = openReadOnly(catalogPath);
  try {
    return fresh.prepare(`SELECT 1 FROM pack WHERE id = ?`).get(packId) === undefined;
  } finally {
    fresh.close();
  }
}

/** Block versions must name chunks stored in their host's vault. */
function checkReferences(db: Database.Database, findings: Finding[]): void {
  const missing = db.prepare(`
    SELECT DISTINCT h.vault_id AS vaultId, bv.chunk_id AS id
    FROM block_version bv JOIN disk d ON d.id = bv.disk_id JOIN host h ON h.id = d.host_id
    WHERE bv.chunk_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM chunk c JOIN vault_number n ON n.number = c.vault WHERE n.vault_id = h.vault_id AND c.id = bv.chunk_id)`)
    .all() as Array<{ vaultId: string; id: Buffer }>;
  for (const m of missing) {
    const idHex = m.id.toString('hex');
    findings.push({ kind: 'catalog', pack: null, offset: null, chunkId: idHex, vaultId: m.vaultId, message: `block versions reference chunk ${idHex}, which is not stored in vault ${m.vaultId}`, affectedPoints: [] });
  }
}

/**
 * A block version (disk D, block B, point Q) naming a damaged chunk breaks
 * every committed point P of D's host with Q ≤ P < the next point that has a
 * version of block B, that covers D and whose disk size includes B (restore
 * ignores blocks past the end, SPEC §5.2).
 */
function addAffectedPoints(db: Database.Database, findings: Finding[]): void {
  const withChunk = findings.filter((f) => f.chunkId !== null && f.vaultId !== null);
  if (withChunk.length === 0) return;
  const insert = db.prepare(`INSERT OR IGNORE INTO temp.verify_damaged (vault_id, id) VALUES (?, ?)`);
  for (const f of withChunk) insert.run(f.vaultId, Buffer.from(f.chunkId!, 'hex'));
  const rows = db.prepare(`
    WITH refs AS (
      SELECT dm.vault_id AS vaultId, bv.chunk_id AS chunkId, bv.disk_id AS diskId, bv.block_index AS block, bv.point_id AS since,
        (SELECT MIN(nx.point_id) FROM block_version nx
         WHERE nx.disk_id = bv.disk_id AND nx.block_index = bv.block_index AND nx.point_id > bv.point_id) AS until
      FROM block_version bv JOIN temp.verify_damaged dm ON dm.id = bv.chunk_id
    )
    SELECT DISTINCT r.vaultId, r.chunkId, h.name AS host, p.id AS pointId, d.name AS disk
    FROM refs r
    JOIN disk d ON d.id = r.diskId
    JOIN host h ON h.id = d.host_id AND h.vault_id = r.vaultId
    JOIN point p ON p.host_id = h.id AND p.state = 'committed' AND p.id >= r.since AND (r.until IS NULL OR p.id < r.until)
    JOIN point_disk pd ON pd.point_id = p.id AND pd.disk_id = d.id
    WHERE r.block * d.block_bytes < pd.size_bytes
    ORDER BY h.name, p.id, d.name`).all() as Array<{ vaultId: string; chunkId: Buffer; host: string; pointId: number; disk: string }>;
  db.exec(`DELETE FROM temp.verify_damaged`);
  const byChunk = new Map<string, AffectedPoint[]>();
  for (const r of rows) {
    const key = `${r.vaultId}:${r.chunkId.toString('hex')}`;
    const list = byChunk.get(key) ?? [];
    list.push({ host: r.host, pointId: r.pointId, disk: r.disk });
    byChunk.set(key, list);
  }
  for (const f of withChunk) f.affectedPoints = byChunk.get(`${f.vaultId}:${f.chunkId}`) ?? [];
  // A pack record lists the union of its chunks' points.
  for (const f of findings) {
    if (!f.chunks?.length) continue;
    const union = new Map<string, AffectedPoint>();
    for (const c of f.chunks) for (const a of c.affectedPoints) union.set(`${a.host}\0${a.pointId}\0${a.disk}`, a);
    f.affectedPoints = [...union.values()].sort((a, b) => a.host.localeCompare(b.host) || a.pointId - b.pointId || a.disk.localeCompare(b.disk));
  }
}

/** "host alpha disk /dev/vdb: points 2, 3" lines for a damage record. */
export function describeAffected(affected: AffectedPoint[]): string[] {
  const groups = new Map<string, { host: string; disk: string; points: number[] }>();
  for (const a of affected) {
    const key = `${a.host}\0${a.disk}`;
    const group = groups.get(key) ?? { host: a.host, disk: a.disk, points: [] };
    group.points.push(a.pointId);
    groups.set(key, group);
  }
  return [...groups.values()].map((g) => `host ${printable(g.host)} disk ${printable(g.disk)}: point${g.points.length > 1 ? 's' : ''} ${g.points.join(', ')}`);
}

/** The CLI command: prints the report (human lines or one JSON document); E_INTEGRITY when anything is damaged. */
export function runReceiverVerify(dir: DataDir, json: boolean): void {
  const report = verifyDataDir(dir);
  if (json) printJson(report);
  else {
    for (const d of report.damaged) {
      process.stdout.write(`DAMAGED ${d.kind}: ${d.message}\n`);
      const lines = describeAffected(d.affectedPoints);
      if (lines.length === 0 && d.kind !== 'pack') process.stdout.write('  no committed point reads it\n');
      for (const line of lines) process.stdout.write(`  breaks restore of ${line}\n`);
    }
    process.stdout.write(`checked ${report.packsChecked} packs, ${report.chunksChecked} chunks, ${formatBytes(report.bytesChecked)}: ` +
      `${report.ok ? 'no damage found' : `${report.damaged.length} damaged`}\n`);
  }
  if (!report.ok) throw damageSummary(report.damaged);
}

function damageSummary(damaged: Damage[]): TidemarkError {
  const points = new Set(damaged.flatMap((d) => d.affectedPoints.map((a) => `${a.host}:${a.pointId}`)));
  const first = damaged[0]!;
  const where = first.chunkId ? `chunk ${first.chunkId}` : first.pack ? `pack ${first.pack}` : 'the catalog';
  return new TidemarkError('E_INTEGRITY',
    `verify found ${damaged.length} damaged object${damaged.length > 1 ? 's' : ''} (first: ${where}) affecting ${points.size} recovery point${points.size === 1 ? '' : 's'}`);
}
