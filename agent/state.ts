// The agent's local state directory (docs/SPEC.md §7):
//
//   DIR/state.db             SQLite: enrollment, disks, the open point, status
//   DIR/credential           the host credential (0600)
//   DIR/hashes/D.shipped.xxh64   XXH64 per block of disk D as of the last committed point
//   DIR/hashes/D.pending.xxh64   the same for the point being built
//
// 8 bytes per block: 128 MiB for a 1 TiB disk of 64 KiB blocks, read in windows.
// Agents before the upgrade kept XXH3-64 in DIR/hashes/D.shipped and D.pending
// (legacy): the first pass of the next sync compares the disk with the legacy
// file, writes the new one, and the commit removes the legacy files.
import Database from 'better-sqlite3';
import { closeSync, copyFileSync, existsSync, fsyncSync, ftruncateSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
import { fsyncDir, writeAllSync, writeFileDurable } from '../shared/fs-util.js';
import type { HostState } from '../shared/protocol.js';
import { addColumnIfMissing } from '../shared/sqlite-schema.js';

export interface Enrollment {
  receiverUrl: string;
  fingerprint: string;
  host: string;
  keyFile: string;
  vaultId: string;
}

export interface DiskRecord {
  path: string;
  diskId: number;
  sizeBytes: number;
  blockBytes: number;
  /** A committed point holds this disk and DIR/hashes/D.shipped describes it. */
  hasBaseline: boolean;
  /** That point's id; null when unknown (recorded by agents before it was kept). */
  baselinePointId: number | null;
  /** Blocks below this index are done for the open point (resume point of an interrupted sync). */
  watermark: number;
}

export interface AgentStatusRecord {
  state: HostState;
  reason: string | null;
  tracker: string;
  lastPointId: number | null;
  lastPointTimeMs: number | null;
  lastPointConsistent: boolean | null;
  progress: unknown;
  backlogBytes: number;
  updatedMs: number;
}

export const STATE_VERSION = 1;

const schema = `
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS disk (
  path TEXT PRIMARY KEY, disk_id INTEGER NOT NULL, size_bytes INTEGER NOT NULL, block_bytes INTEGER NOT NULL,
  has_baseline INTEGER NOT NULL DEFAULT 0, watermark INTEGER NOT NULL DEFAULT 0, baseline_point INTEGER);
`;

export class AgentState {
  private readonly db: Database.Database;

  private constructor(readonly dir: string) {
    mkdirSync(join(dir, 'hashes'), { recursive: true, mode: 0o700 });
    this.db = new Database(join(dir, 'state.db'));
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = FULL');
    this.db.exec(schema);
    // Added within schema version 1: older agents leave it NULL (unknown), which they may still do.
    addColumnIfMissing(this.db, 'disk', 'baseline_point', 'INTEGER');
    const version = this.get('schemaVersion');
    if (version === undefined) this.set({ schemaVersion: String(STATE_VERSION) });
    else if (version !== String(STATE_VERSION)) {
      this.db.close();
      throw new TidemarkError('E_STATE', `${dir}/state.db has schema version ${version}; this agent reads version ${STATE_VERSION}: use the tidemark release that wrote it`);
    }
  }

  static open(dir: string, options: { mustBeEnrolled: boolean }): AgentState {
    if (options.mustBeEnrolled && !existsSync(join(dir, 'state.db'))) {
      throw new TidemarkError('E_STATE', `${dir} holds no agent state; enroll first with tidemark-agent enroll --state ${dir} ...`);
    }
    let state: AgentState;
    try {
      state = new AgentState(dir);
    } catch (err) {
      throw asTidemarkError(err, { stateDir: dir }); // a full filesystem fails even opening state.db (its -shm)
    }
    if (options.mustBeEnrolled && !state.enrollment()) {
      state.close();
      throw new TidemarkError('E_STATE', `agent in ${dir} is not enrolled; run tidemark-agent enroll first`);
    }
    return state;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  private get(key: string): string | undefined {
    return this.db.prepare(`SELECT value FROM config WHERE key = ?`).pluck().get(key) as string | undefined;
  }

  private set(entries: Record<string, string>): void {
    const put = this.db.prepare(`INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)`);
    this.db.transaction(() => {
      for (const [k, v] of Object.entries(entries)) put.run(k, v);
    })();
  }

  enrollment(): Enrollment | undefined {
    const value = this.get('enrollment');
    return value ? (JSON.parse(value) as Enrollment) : undefined;
  }

  saveEnrollment(enrollment: Enrollment, credential: string): void {
    writeFileDurable(join(this.dir, 'credential'), credential + '\n', 0o600);
    this.set({ enrollment: JSON.stringify(enrollment) });
    this.saveStatus({ state: 'Initialized', reason: 'enrolled; nothing sent yet' });
  }

  credential(): string {
    return readFileSync(join(this.dir, 'credential'), 'utf8').trim();
  }

  status(): AgentStatusRecord {
    const value = this.get('status');
    const defaults: AgentStatusRecord = {
      state: 'Initialized', reason: null, tracker: 'scan', lastPointId: null, lastPointTimeMs: null,
      lastPointConsistent: null, progress: null, backlogBytes: 0, updatedMs: Date.now(),
    };
    return value ? { ...defaults, ...(JSON.parse(value) as Partial<AgentStatusRecord>) } : defaults;
  }

  saveStatus(update: Partial<AgentStatusRecord>): void {
    this.set({ status: JSON.stringify({ ...this.status(), ...update, updatedMs: Date.now() }) });
  }

  /** The tracefs instance this agent made, to recognize it after a restart. */
  trackingState(): { instance: string; inode: number } | null {
    const value = this.get('tracking');
    return value ? (JSON.parse(value) as { instance: string; inode: number }) : null;
  }

  saveTrackingState(tracking: { instance: string; inode: number } | null): void {
    if (tracking === null) this.db.prepare(`DELETE FROM config WHERE key = 'tracking'`).run();
    else this.set({ tracking: JSON.stringify(tracking) });
  }

  /** The point this agent was building when it stopped, to resume it. */
  openPointId(): number | null {
    const value = this.get('openPointId');
    return value ? Number(value) : null;
  }

  setOpenPointId(pointId: number | null): void {
    if (pointId === null) this.db.prepare(`DELETE FROM config WHERE key = 'openPointId'`).run();
    else this.set({ openPointId: String(pointId) });
  }

  disks(): DiskRecord[] {
    return (this.db.prepare(`SELECT * FROM disk ORDER BY path`).all() as Array<Record<string, number | string>>).map(toDiskRecord);
  }

  disk(path: string): DiskRecord | undefined {
    const row = this.db.prepare(`SELECT * FROM disk WHERE path = ?`).get(path) as Record<string, number | string> | undefined;
    return row ? toDiskRecord(row) : undefined;
  }

  saveDisk(d: DiskRecord): void {
    this.db.prepare(`INSERT OR REPLACE INTO disk (path, disk_id, size_bytes, block_bytes, has_baseline, watermark, baseline_point) VALUES (?, ?, ?, ?, ?, ?, ?)`)
      .run(d.path, d.diskId, d.sizeBytes, d.blockBytes, d.hasBaseline ? 1 : 0, d.watermark, d.hasBaseline ? d.baselinePointId : null);
  }

  setWatermark(path: string, watermark: number): void {
    this.db.prepare(`UPDATE disk SET watermark = ? WHERE path = ?`).run(watermark, path);
  }

  hashPath(diskId: number, kind: 'shipped' | 'pending'): string {
    return join(this.dir, 'hashes', `${diskId}.${kind}.xxh64`);
  }

  private legacyHashPath(diskId: number, kind: 'shipped' | 'pending'): string {
    return join(this.dir, 'hashes', `${diskId}.${kind}`);
  }

  /** The legacy (XXH3-64) hashes of the last point, while they are all this disk has; else null. */
  legacyShippedPath(d: DiskRecord): string | null {
    const legacy = this.legacyHashPath(d.diskId, 'shipped');
    return d.hasBaseline && !existsSync(this.hashPath(d.diskId, 'shipped')) && existsSync(legacy) ? legacy : null;
  }

  /**
   * A point committed while its hashes were still pending (the agent stopped
   * before recording the commit): those hashes describe the point exactly and
   * become the shipped ones. False when there are none.
   */
  adoptPending(diskId: number): boolean {
    if (existsSync(this.hashPath(diskId, 'pending'))) {
      this.promotePending(diskId);
      return true;
    }
    // Left by an agent before the upgrade: still legacy hashes, so they become the legacy shipped ones.
    if (!existsSync(this.legacyHashPath(diskId, 'pending'))) return false;
    renameSync(this.legacyHashPath(diskId, 'pending'), this.legacyHashPath(diskId, 'shipped'));
    fsyncDir(join(this.dir, 'hashes'));
    return true;
  }

  /** Starts a point: the pending hashes begin as the shipped ones (or `fill` when there is no baseline). */
  startPending(d: DiskRecord, blockCount: number, fill: bigint): void {
    const pending = this.hashPath(d.diskId, 'pending');
    const shipped = this.hashPath(d.diskId, 'shipped');
    if (d.hasBaseline && existsSync(shipped)) copyFileSync(shipped, pending);
    else HashFile.create(pending, blockCount, fill);
  }

  /** After the receiver acknowledged the commit: the pending hashes become the shipped ones. */
  promotePending(diskId: number): void {
    renameSync(this.hashPath(diskId, 'pending'), this.hashPath(diskId, 'shipped'));
    fsyncDir(join(this.dir, 'hashes'));
    this.dropLegacyHashes(diskId); // after the new hashes are durable: a crash before leaves both, and the new win
  }

  dropHashes(diskId: number): void {
    rmSync(this.hashPath(diskId, 'pending'), { force: true });
    rmSync(this.hashPath(diskId, 'shipped'), { force: true });
    this.dropLegacyHashes(diskId);
  }

  private dropLegacyHashes(diskId: number): void {
    rmSync(this.legacyHashPath(diskId, 'pending'), { force: true });
    rmSync(this.legacyHashPath(diskId, 'shipped'), { force: true });
  }
}

function toDiskRecord(row: Record<string, number | string>): DiskRecord {
  return {
    path: row.path as string,
    diskId: row.disk_id as number,
    sizeBytes: row.size_bytes as number,
    blockBytes: row.block_bytes as number,
    hasBaseline: row.has_baseline === 1,
    baselinePointId: (row.baseline_point as number | null) ?? null,
    watermark: row.watermark as number,
  };
}

/** A flat file of little-endian u64 hashes, one per block, read and written in windows. */
export class HashFile {
  private constructor(private readonly fd: number) {}

  static create(path: string, blockCount: number, fill: bigint): void {
    const fd = openSync(path, 'w', 0o600);
    try {
      ftruncateSync(fd, blockCount * 8);
      if (fill !== 0n) {
        const window = new BigUint64Array(Math.min(blockCount, 65536)).fill(fill);
        for (let i = 0; i < blockCount; i += window.length) {
          const n = Math.min(window.length, blockCount - i);
          writeAllSync(fd, [Buffer.from(window.buffer, 0, n * 8)], i * 8);
        }
      }
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  static open(path: string): HashFile {
    return new HashFile(openSync(path, 'r+'));
  }

  read(firstBlock: number, count: number): BigUint64Array {
    const out = new BigUint64Array(count);
    readSync(this.fd, new Uint8Array(out.buffer), 0, count * 8, firstBlock * 8);
    return out;
  }

  /** Every byte or an error: a short write on a full filesystem would leave older hashes for staged blocks. */
  write(firstBlock: number, values: BigUint64Array): void {
    writeAllSync(this.fd, [Buffer.from(values.buffer, values.byteOffset, values.byteLength)], firstBlock * 8);
  }

  sync(): void {
    fsyncSync(this.fd);
  }

  close(): void {
    closeSync(this.fd);
  }
}
