// The receiver's catalog: one SQLite database (WAL, synchronous=FULL) that maps
// chunks to pack files and records, per recovery point, which blocks changed.
// Schema and invariants: docs/SPEC.md §5.
import Database, { type Statement } from 'better-sqlite3';
import { createHash, randomBytes } from 'node:crypto';
import { TidemarkError } from '../shared/errors.js';
import type { HostState, PointInfo } from '../shared/protocol.js';
import { addColumnIfMissing } from '../shared/sqlite-schema.js';

export const CATALOG_VERSION = 2;

/** The chunk table's definition: the schema's, and what a version 1 catalog's rows are copied into. */
const CHUNK_TABLE = `(
  vault INTEGER NOT NULL REFERENCES vault_number(number), id BLOB NOT NULL,
  pack_id INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
  PRIMARY KEY (vault, id)) WITHOUT ROWID`;

/** SQL for the number of the vault named by the next `?` (NULL when it has no chunks yet). */
const VAULT_NUMBER_OF = `(SELECT number FROM vault_number WHERE vault_id = ?)`;

const schema = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS token (
  hash BLOB PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('enroll', 'restore')),
  created_ms INTEGER NOT NULL, used_ms INTEGER, host_id INTEGER, expires_ms INTEGER);
CREATE TABLE IF NOT EXISTS host (
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, vault_id TEXT NOT NULL,
  credential_hash BLOB NOT NULL UNIQUE, enrolled_ms INTEGER NOT NULL);
-- Hosts whose credential was revoked (tidemark-receiver revoke --host); re-enrolling one deletes its row.
CREATE TABLE IF NOT EXISTS host_revocation (host_id INTEGER PRIMARY KEY REFERENCES host(id), revoked_ms INTEGER NOT NULL);
-- Tokens deleted by tidemark-receiver revoke --token, by id, so that revoking one again says when it was.
CREATE TABLE IF NOT EXISTS token_revocation (id TEXT PRIMARY KEY, kind TEXT NOT NULL, revoked_ms INTEGER NOT NULL);
-- A vault is recorded by its first enrollment; proof_hash = SHA-256 of VaultKeys.vaultProof (receiver/vault-proof.ts).
CREATE TABLE IF NOT EXISTS vault (vault_id TEXT PRIMARY KEY, proof_hash BLOB NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS disk (
  id INTEGER PRIMARY KEY, host_id INTEGER NOT NULL REFERENCES host(id), name TEXT NOT NULL,
  size_bytes INTEGER NOT NULL, sector_bytes INTEGER NOT NULL, block_bytes INTEGER NOT NULL,
  UNIQUE (host_id, name));
CREATE TABLE IF NOT EXISTS pack (
  id INTEGER PRIMARY KEY, vault_id TEXT NOT NULL, file TEXT NOT NULL UNIQUE, size_bytes INTEGER NOT NULL,
  -- 1: no writer appends to it any more; only sealed packs are compacted.
  sealed INTEGER NOT NULL DEFAULT 0);
-- Chunk rows name their vault by number: its 32-character id was 40 % of every chunk row (v1).
-- Numbers are allotted at a vault's first chunk and never deleted, so never reused.
CREATE TABLE IF NOT EXISTS vault_number (number INTEGER PRIMARY KEY, vault_id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS chunk ${CHUNK_TABLE};
CREATE TABLE IF NOT EXISTS point (
  -- AUTOINCREMENT: ids are never reused, so a host's open point always has its largest id.
  id INTEGER PRIMARY KEY AUTOINCREMENT, host_id INTEGER NOT NULL REFERENCES host(id),
  state TEXT NOT NULL CHECK (state IN ('open', 'committed')),
  time_ms INTEGER, crash_consistent INTEGER, committed_ms INTEGER);
CREATE INDEX IF NOT EXISTS point_by_host ON point (host_id, state, id);
CREATE TABLE IF NOT EXISTS point_disk (
  point_id INTEGER NOT NULL, disk_id INTEGER NOT NULL, size_bytes INTEGER NOT NULL,
  changed_blocks INTEGER NOT NULL, changed_bytes INTEGER NOT NULL,
  PRIMARY KEY (point_id, disk_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS block_version (
  disk_id INTEGER NOT NULL, block_index INTEGER NOT NULL, point_id INTEGER NOT NULL, chunk_id BLOB,
  PRIMARY KEY (disk_id, block_index, point_id)) WITHOUT ROWID;
-- Per-point access (commit counts, discarding an open point, retention) in O(blocks of that point).
CREATE INDEX IF NOT EXISTS block_version_by_point ON block_version (point_id, disk_id);
-- The newest status.report of each host's agent (receiver clock).
CREATE TABLE IF NOT EXISTS host_report (
  host_id INTEGER PRIMARY KEY REFERENCES host(id), state TEXT NOT NULL, reason TEXT, tracker TEXT,
  backlog_bytes INTEGER NOT NULL, bytes_per_second INTEGER NOT NULL, reported_ms INTEGER NOT NULL);
`;

/** Who a connection is; `secretHash` is what it authenticated with, checked again while it lasts (stillValid). */
export type Principal =
  | { role: 'agent'; hostId: number; host: string; vaultId: string; secretHash: Buffer }
  | { role: 'restore'; secretHash: Buffer }
  | { role: 'enroll'; tokenHash: Buffer };

/** A token as `tidemark-receiver token --list` shows it: never the secret, only a prefix of its hash. */
export interface TokenInfo {
  /** The first TOKEN_ID_HEX hex digits of the token's SHA-256: what `revoke --token` takes. */
  id: string;
  kind: 'enroll' | 'restore';
  createdAt: string;
  /** When an enrollment token was used; null while unused (and for restore tokens). */
  usedAt: string | null;
  /** When it stops working; null: never (until revoked). */
  expiresAt: string | null;
  /** The host an enrollment token enrolled, or re-enrolls when used (token --host). */
  host: string | null;
}

const TOKEN_ID_HEX = 16;

/** A token's id as `token --list` shows it and `revoke --token` takes it (never the secret). */
export function tokenIdOf(token: string): string {
  return idOfTokenHash(hashSecret(token));
}

function idOfTokenHash(hash: Buffer): string {
  return hash.toString('hex').slice(0, TOKEN_ID_HEX);
}

export interface DiskRow {
  id: number;
  hostId: number;
  name: string;
  sizeBytes: number;
  blockBytes: number;
}

export interface ChunkLocation {
  packId: number;
  file: string;
  offset: number;
  length: number;
}

export interface NewChunk {
  vaultId: string;
  id: Buffer;
  packId: number;
  offset: number;
  length: number;
}

export function hashSecret(secret: string): Buffer {
  return createHash('sha256').update(secret).digest();
}

function newSecret(prefix: string): string {
  return `${prefix}_${randomBytes(24).toString('base64url')}`;
}

export class Catalog {
  readonly db: Database.Database;

  private constructor(path: string) {
    this.db = new Database(path);
    this.db.pragma('journal_mode = WAL');
    // FULL: a transaction that returned is on disk; a point acknowledged to the agent survives power loss.
    this.db.pragma('synchronous = FULL');
    this.db.pragma('foreign_keys = ON');
    this.db.pragma('busy_timeout = 5000');
  }

  static open(path: string): Catalog {
    const catalog = new Catalog(path);
    catalog.db.exec(schema);
    addColumnIfMissing(catalog.db, 'token', 'expires_ms', 'INTEGER');
    const version = catalog.db.prepare(`SELECT value FROM meta WHERE key = 'catalog_version'`).pluck().get() as string | undefined;
    if (version === undefined) catalog.db.prepare(`INSERT INTO meta VALUES ('catalog_version', ?)`).run(String(CATALOG_VERSION));
    else if (version === '1') catalog.upgradeFromVersion1();
    else if (Number(version) !== CATALOG_VERSION) {
      catalog.close();
      throw new TidemarkError('E_STORAGE', `catalog ${path} has format version ${version}; this receiver reads version ${CATALOG_VERSION}`, { retryable: false });
    }
    return catalog;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  /**
   * Catalog v1 → v2 (SPEC §2): chunk rows keyed by vault number instead of vault id. One
   * transaction: a crash or a full disk leaves version 1 whole, and the next open tries again.
   * The rows are copied in key order, so the new table's pages are full.
   */
  private upgradeFromVersion1(): void {
    this.db.transaction(() => {
      this.db.exec(`
        INSERT OR IGNORE INTO vault_number (vault_id) SELECT DISTINCT vault_id FROM chunk ORDER BY vault_id;
        CREATE TABLE chunk_v2 ${CHUNK_TABLE};
        INSERT INTO chunk_v2 (vault, id, pack_id, offset, length)
          SELECT n.number, c.id, c.pack_id, c.offset, c.length FROM chunk c JOIN vault_number n ON n.vault_id = c.vault_id ORDER BY n.number, c.id;
        DROP TABLE chunk;
        ALTER TABLE chunk_v2 RENAME TO chunk;
        UPDATE meta SET value = '2' WHERE key = 'catalog_version';`);
    }).immediate();
  }

  /** The number chunk rows give the vault; allotted (in a transaction of its own) at its first chunk. */
  private vaultNumber(vaultId: string): number {
    const find = this.db.prepare(`SELECT number FROM vault_number WHERE vault_id = ?`).pluck();
    const found = find.get(vaultId) as number | undefined;
    if (found !== undefined) return found;
    this.db.prepare(`INSERT OR IGNORE INTO vault_number (vault_id) VALUES (?)`).run(vaultId);
    return find.get(vaultId) as number;
  }

  // --- tokens and principals ---------------------------------------------

  /**
   * `reenrollHost`: an enrollment token that gives that existing host a new credential (its old
   * one stops working). `expiresMs`: when the token stops working (default: never, until revoked).
   */
  createToken(kind: 'enroll' | 'restore', options: { reenrollHost?: string; expiresMs?: number } = {}): string {
    const token = newSecret(kind === 'enroll' ? 'tmenroll' : 'tmrestore');
    const hostId = options.reenrollHost === undefined ? null : this.hostIdOf(options.reenrollHost);
    this.db.prepare(`INSERT INTO token (hash, kind, created_ms, host_id, expires_ms) VALUES (?, ?, ?, ?, ?)`)
      .run(hashSecret(token), kind, Date.now(), hostId, options.expiresMs ?? null);
    return token;
  }

  private hostIdOf(name: string): number {
    const id = this.db.prepare(`SELECT id FROM host WHERE name = ?`).pluck().get(name) as number | undefined;
    if (id === undefined) throw new TidemarkError('E_NOT_FOUND', `no host named "${name}" is enrolled; tidemark-receiver status lists them`);
    return id;
  }

  listTokens(): TokenInfo[] {
    const rows = this.db.prepare(`
      SELECT t.hash, t.kind, t.created_ms AS createdMs, t.used_ms AS usedMs, t.expires_ms AS expiresMs, h.name AS host
      FROM token t LEFT JOIN host h ON h.id = t.host_id ORDER BY t.created_ms, t.hash`).all() as
      Array<{ hash: Buffer; kind: 'enroll' | 'restore'; createdMs: number; usedMs: number | null; expiresMs: number | null; host: string | null }>;
    const time = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());
    return rows.map((r) => ({
      id: idOfTokenHash(r.hash), kind: r.kind, createdAt: time(r.createdMs)!, usedAt: time(r.usedMs), expiresAt: time(r.expiresMs), host: r.host,
    }));
  }

  /**
   * Deletes the token whose id (as listTokens shows it) is `id`: a restore token stops working, an
   * enrollment token cannot be used. Revoking it again changes nothing and says when it was revoked.
   */
  revokeToken(id: string): { token: Pick<TokenInfo, 'id' | 'kind'> & Partial<TokenInfo>; revokedAt: string; alreadyRevoked: boolean } {
    if (!new RegExp(`^[0-9a-f]{${TOKEN_ID_HEX}}$`).test(id)) {
      throw new TidemarkError('E_USAGE', `invalid token id "${id}": use the ${TOKEN_ID_HEX}-digit id that tidemark-receiver token --list shows`);
    }
    return this.db.transaction(() => {
      const earlier = this.db.prepare(`SELECT kind, revoked_ms AS revokedMs FROM token_revocation WHERE id = ?`).get(id) as { kind: TokenInfo['kind']; revokedMs: number } | undefined;
      if (earlier) return { token: { id, kind: earlier.kind }, revokedAt: new Date(earlier.revokedMs).toISOString(), alreadyRevoked: true };
      const token = this.listTokens().find((t) => t.id === id);
      if (!token) throw new TidemarkError('E_NOT_FOUND', `no token with id ${id}; tidemark-receiver token --list shows them`);
      const nowMs = Date.now();
      this.db.prepare(`DELETE FROM token WHERE substr(hex(hash), 1, ${TOKEN_ID_HEX}) = upper(?)`).run(id);
      this.db.prepare(`INSERT INTO token_revocation (id, kind, revoked_ms) VALUES (?, ?, ?)`).run(id, token.kind, nowMs);
      return { token, revokedAt: new Date(nowMs).toISOString(), alreadyRevoked: false };
    }).immediate();
  }

  /**
   * The host's credential stops working: new connections are refused, open sessions are closed at the
   * receiver's next heartbeat. Its points stay (restore tokens read them); `token --host` lets it enroll again.
   * Revoking it again changes nothing (its revocation time stays) and says so.
   */
  revokeHost(name: string): { host: string; revokedAt: string; alreadyRevoked: boolean } {
    return this.db.transaction(() => {
      const hostId = this.hostIdOf(name);
      const earlier = this.db.prepare(`SELECT revoked_ms FROM host_revocation WHERE host_id = ?`).pluck().get(hostId) as number | undefined;
      if (earlier !== undefined) return { host: name, revokedAt: new Date(earlier).toISOString(), alreadyRevoked: true };
      const nowMs = Date.now();
      // No secret hashes to fresh random bytes: the credential column stays unique and matches nothing.
      this.db.prepare(`UPDATE host SET credential_hash = ? WHERE id = ?`).run(randomBytes(32), hostId);
      this.db.prepare(`INSERT INTO host_revocation (host_id, revoked_ms) VALUES (?, ?)`).run(hostId, nowMs);
      return { host: name, revokedAt: new Date(nowMs).toISOString(), alreadyRevoked: false };
    }).immediate();
  }

  /** Whether the secret a session authenticated with still names the same principal (not revoked, replaced or expired). */
  stillValid(p: Principal): boolean {
    if (p.role === 'agent') return this.db.prepare(`SELECT 1 FROM host WHERE id = ? AND credential_hash = ?`).get(p.hostId, p.secretHash) !== undefined;
    return p.role === 'restore' ? this.validToken(p.secretHash, 'restore') : this.validToken(p.tokenHash, 'enroll');
  }

  /** The principal an Authorization header names, or undefined when it names nobody. */
  authenticate(scheme: 'Bearer' | 'Token', secret: string): Principal | undefined {
    const hash = hashSecret(secret);
    if (scheme === 'Token') return this.validToken(hash, 'enroll') ? { role: 'enroll', tokenHash: hash } : undefined;
    const host = this.db.prepare(`SELECT id, name, vault_id FROM host WHERE credential_hash = ?`).get(hash) as { id: number; name: string; vault_id: string } | undefined;
    if (host) return { role: 'agent', hostId: host.id, host: host.name, vaultId: host.vault_id, secretHash: hash };
    return this.validToken(hash, 'restore') ? { role: 'restore', secretHash: hash } : undefined;
  }

  /** A token of that kind that works now: not expired, and for enrollment, unused. */
  private validToken(hash: Buffer, kind: 'enroll' | 'restore'): boolean {
    return this.db.prepare(`SELECT 1 FROM token WHERE hash = ? AND kind = ? AND (kind = 'restore' OR used_ms IS NULL) AND (expires_ms IS NULL OR expires_ms > ?)`)
      .get(hash, kind, Date.now()) !== undefined;
  }

  /**
   * Consumes the enrollment token and creates the host, atomically: a token works once. A
   * token made with `token --host NAME` instead gives that host a new credential: the same
   * name and vault only, so its points and disks carry on.
   */
  enrollHost(tokenHash: Buffer, name: string, vaultId: string): { hostId: number; credential: string } {
    return this.db.transaction(() => {
      if (!this.validToken(tokenHash, 'enroll')) throw new TidemarkError('E_AUTH', 'enrollment token already used, expired or revoked; create a new one with tidemark-receiver token');
      const token = this.db.prepare(`SELECT host_id AS hostId FROM token WHERE hash = ?`).get(tokenHash) as { hostId: number | null };
      const credential = newSecret('tmhost');
      const nowMs = Date.now();
      let hostId: number;
      if (token.hostId === null) {
        if (this.db.prepare(`SELECT 1 FROM host WHERE name = ?`).get(name)) {
          throw new TidemarkError('E_CONFLICT', `a host named "${name}" is already enrolled; choose another --host name (or, to replace its credential, enroll with a token from tidemark-receiver token --host ${name})`);
        }
        hostId = Number(this.db.prepare(`INSERT INTO host (name, vault_id, credential_hash, enrolled_ms) VALUES (?, ?, ?, ?)`)
          .run(name, vaultId, hashSecret(credential), nowMs).lastInsertRowid);
      } else {
        const host = this.db.prepare(`SELECT name, vault_id AS vaultId FROM host WHERE id = ?`).get(token.hostId) as { name: string; vaultId: string };
        if (host.name !== name) throw new TidemarkError('E_CONFLICT', `this token re-enrolls host "${host.name}"; pass --host ${host.name}`);
        if (host.vaultId !== vaultId) throw new TidemarkError('E_FORBIDDEN', `host "${host.name}" was enrolled with another key file (vault ${host.vaultId}); re-enroll it with that key file`);
        hostId = token.hostId;
        this.db.prepare(`UPDATE host SET credential_hash = ?, enrolled_ms = ? WHERE id = ?`).run(hashSecret(credential), nowMs, hostId);
        this.db.prepare(`DELETE FROM host_revocation WHERE host_id = ?`).run(hostId);
      }
      this.db.prepare(`UPDATE token SET used_ms = ?, host_id = ? WHERE hash = ?`).run(nowMs, hostId, tokenHash);
      return { hostId, credential };
    }).immediate();
  }

  // --- disks and points ---------------------------------------------------

  registerDisk(hostId: number, name: string, sizeBytes: number, sectorBytes: number, blockBytes: number): { diskId: number; hasHistory: boolean; lastPointId: number | null } {
    return this.db.transaction(() => {
      const row = this.db.prepare(`SELECT id, block_bytes FROM disk WHERE host_id = ? AND name = ?`).get(hostId, name) as { id: number; block_bytes: number } | undefined;
      if (!row) {
        const diskId = Number(this.db.prepare(`INSERT INTO disk (host_id, name, size_bytes, sector_bytes, block_bytes) VALUES (?, ?, ?, ?, ?)`)
          .run(hostId, name, sizeBytes, sectorBytes, blockBytes).lastInsertRowid);
        return { diskId, hasHistory: false, lastPointId: null };
      }
      if (row.block_bytes !== blockBytes) {
        throw new TidemarkError('E_CONFLICT', `disk ${name} was first synced with ${row.block_bytes}-byte blocks; the block size is fixed per disk (drop --block-size)`);
      }
      this.db.prepare(`UPDATE disk SET size_bytes = ?, sector_bytes = ? WHERE id = ?`).run(sizeBytes, sectorBytes, row.id);
      const hasHistory = this.db.prepare(`SELECT 1 FROM block_version WHERE disk_id = ? LIMIT 1`).get(row.id) !== undefined;
      // point_disk holds committed points only.
      const lastPointId = this.db.prepare(`SELECT MAX(point_id) FROM point_disk WHERE disk_id = ?`).pluck().get(row.id) as number | null;
      return { diskId: row.id, hasHistory, lastPointId };
    }).immediate();
  }

  disk(diskId: number): DiskRow | undefined {
    return this.db.prepare(`SELECT id, host_id AS hostId, name, size_bytes AS sizeBytes, block_bytes AS blockBytes FROM disk WHERE id = ?`).get(diskId) as
      DiskRow | undefined;
  }

  /**
   * A disk the host writes to. One no longer registered (`forget` removed it) is retryable:
   * the agent registers it again on its next session, as a new disk.
   */
  ownDisk(hostId: number, diskId: number): DiskRow {
    const disk = this.disk(diskId);
    if (!disk) throw new TidemarkError('E_NOT_FOUND', `disk ${diskId} is not registered on the receiver (it was forgotten there); register it again`, { retryable: true });
    if (disk.hostId !== hostId) throw new TidemarkError('E_FORBIDDEN', `disk ${diskId} does not belong to this host`);
    return disk;
  }

  /**
   * A host has at most one open point. `resume` continues it (an interrupted
   * sync keeps what it staged); anything else discards it and opens a new one.
   */
  beginPoint(hostId: number, resume: number | null): { pointId: number; resumed: boolean; resumeCommitted: boolean } {
    return this.db.transaction(() => {
      const open = this.db.prepare(`SELECT id FROM point WHERE host_id = ? AND state = 'open'`).pluck().get(hostId) as number | undefined;
      if (open !== undefined && open === resume) return { pointId: open, resumed: true, resumeCommitted: false };
      if (open !== undefined) this.discardOpenPoint(open);
      const resumeCommitted = resume !== null &&
        this.db.prepare(`SELECT 1 FROM point WHERE id = ? AND host_id = ? AND state = 'committed'`).get(resume, hostId) !== undefined;
      const pointId = Number(this.db.prepare(`INSERT INTO point (host_id, state) VALUES (?, 'open')`).run(hostId).lastInsertRowid);
      return { pointId, resumed: false, resumeCommitted };
    }).immediate();
  }

  private discardOpenPoint(pointId: number): void {
    this.db.prepare(`DELETE FROM block_version WHERE point_id = ?`).run(pointId);
    this.db.prepare(`DELETE FROM point WHERE id = ? AND state = 'open'`).run(pointId);
  }

  openPointOf(hostId: number, pointId: number): boolean {
    return this.db.prepare(`SELECT 1 FROM point WHERE id = ? AND host_id = ? AND state = 'open'`).get(pointId, hostId) !== undefined;
  }

  /**
   * Stages block versions into an open point; every referenced chunk must already be stored in
   * the vault. A block whose content is what the disk's last committed point already has is not
   * staged (and what this point staged for it before is dropped): an agent that compares every
   * block (a rolled-back or re-enrolled host) ships every block, but the point records only
   * those that changed, so the catalog does not grow by a whole disk.
   */
  stageBlocks(vaultId: string, pointId: number, diskId: number, blocks: number[], ids: Array<Buffer | null>): void {
    const hasChunk = this.db.prepare(`SELECT 1 FROM chunk WHERE vault = ${VAULT_NUMBER_OF} AND id = ?`);
    // The host's open point has its largest point id (SPEC §5.2 rule 6): below it, committed versions only.
    const committed = this.db.prepare(`
      SELECT chunk_id FROM block_version WHERE disk_id = ? AND block_index = ? AND point_id < ?
      ORDER BY point_id DESC LIMIT 1`).pluck();
    const upsert = this.db.prepare(`INSERT OR REPLACE INTO block_version (disk_id, block_index, point_id, chunk_id) VALUES (?, ?, ?, ?)`);
    const unstage = this.db.prepare(`DELETE FROM block_version WHERE disk_id = ? AND block_index = ? AND point_id = ?`);
    this.db.transaction(() => {
      for (let i = 0; i < blocks.length; i++) {
        const id = ids[i]!;
        if (id !== null && !hasChunk.get(vaultId, id)) {
          // Retryable, not a protocol error: prune may have collected it after a query said it was there.
          throw new TidemarkError('E_NOT_FOUND', `block ${blocks[i]} references chunk ${id.toString('hex')} that is not stored; upload it first`, { retryable: true });
        }
        const before = (committed.get(diskId, blocks[i], pointId) as Buffer | null | undefined) ?? null; // no row: zeros
        if (sameContent(before, id)) unstage.run(diskId, blocks[i], pointId);
        else upsert.run(diskId, blocks[i], pointId, id);
      }
    }).immediate();
  }

  /**
   * Sets a point's changed_blocks and changed_bytes of a disk from its block versions (the
   * short last block counts its real length): what the agent reports may count blocks twice
   * (shipped again by a later pass) or miss some (staged before it resumed the point).
   */
  private countChanges(pointId: number, diskId: number): void {
    this.db.prepare(`
      UPDATE point_disk SET (changed_blocks, changed_bytes) = (
        SELECT COUNT(*), COALESCE(SUM(MAX(0, MIN(d.block_bytes, point_disk.size_bytes - bv.block_index * d.block_bytes))), 0)
        FROM block_version bv JOIN disk d ON d.id = bv.disk_id WHERE bv.point_id = :p AND bv.disk_id = :d)
      WHERE point_id = :p AND disk_id = :d`).run({ p: pointId, d: diskId });
  }

  /**
   * Commits an open point with the disks it lists. Versions staged for a disk it does not
   * list are discarded (an agent restarted with fewer disks resumes its open point): a later
   * point of that disk would otherwise read them as its own. Returns how many were discarded.
   */
  commitPoint(hostId: number, pointId: number, timeMs: number, crashConsistent: boolean, disks: Array<{ diskId: number }>): number {
    return this.db.transaction(() => {
      if (!this.openPointOf(hostId, pointId)) throw new TidemarkError('E_CONFLICT', `point ${pointId} is not open for this host (already committed or discarded)`);
      const listed = new Set(disks.map((d) => d.diskId));
      if (listed.size !== disks.length) throw new TidemarkError('E_PROTOCOL', 'point.commit names a disk twice');
      const insert = this.db.prepare(`INSERT INTO point_disk (point_id, disk_id, size_bytes, changed_blocks, changed_bytes) VALUES (?, ?, ?, 0, 0)`);
      for (const d of disks) {
        const disk = this.ownDisk(hostId, d.diskId);
        insert.run(pointId, d.diskId, disk.sizeBytes);
        this.countChanges(pointId, d.diskId);
      }
      const unlisted = (this.db.prepare(`SELECT id FROM disk WHERE host_id = ?`).pluck().all(hostId) as number[]).filter((id) => !listed.has(id));
      const discard = this.db.prepare(`DELETE FROM block_version WHERE point_id = ? AND disk_id = ?`);
      const discarded = unlisted.reduce((sum, diskId) => sum + discard.run(pointId, diskId).changes, 0);
      this.db.prepare(`UPDATE point SET state = 'committed', time_ms = ?, crash_consistent = ?, committed_ms = ? WHERE id = ?`)
        .run(timeMs, crashConsistent ? 1 : 0, Date.now(), pointId);
      return discarded;
    }).immediate();
  }

  /** A page of committed points, oldest first, of the hosts a principal may read; `next` continues it. */
  listPoints(vaultId: string, hostName: string | null, afterId: number | null, limit: number): { points: PointInfo[]; next: number | null } {
    const rows = this.db.prepare(`
      SELECT p.id, h.name AS host, p.time_ms AS timeMs, p.committed_ms AS committedMs, p.crash_consistent AS cc
      FROM point p JOIN host h ON h.id = p.host_id
      WHERE p.state = 'committed' AND h.vault_id = ? AND (? IS NULL OR h.name = ?) AND p.id > ?
      ORDER BY p.id LIMIT ?`).all(vaultId, hostName, hostName, afterId ?? 0, limit + 1) as Array<{ id: number; host: string; timeMs: number; committedMs: number; cc: number }>;
    const points = rows.slice(0, limit);
    const next = rows.length > limit ? points.at(-1)!.id : null;
    const disks = this.db.prepare(`
      SELECT d.id AS diskId, d.name, pd.size_bytes AS sizeBytes, d.block_bytes AS blockBytes, pd.changed_bytes AS changedBytes
      FROM point_disk pd JOIN disk d ON d.id = pd.disk_id WHERE pd.point_id = ? ORDER BY d.name`);
    return {
      points: points.map((p) => ({
        id: p.id, host: p.host, timeMs: p.timeMs, committedMs: p.committedMs, crashConsistent: p.cc === 1,
        disks: disks.all(p.id) as PointInfo['disks'],
      })),
      next,
    };
  }

  /** Whether the vault has a host of that name (a restore token sees only the hosts of its session's vault). */
  hostInVault(vaultId: string, name: string): boolean {
    return this.db.prepare(`SELECT 1 FROM host WHERE vault_id = ? AND name = ?`).get(vaultId, name) !== undefined;
  }

  /** Host name and vault of a committed point, for authorization. */
  pointOwner(pointId: number): { hostId: number; host: string; vaultId: string } | undefined {
    return this.db.prepare(`
      SELECT h.id AS hostId, h.name AS host, h.vault_id AS vaultId FROM point p JOIN host h ON h.id = p.host_id
      WHERE p.id = ? AND p.state = 'committed'`).get(pointId) as { hostId: number; host: string; vaultId: string } | undefined;
  }

  /**
   * The non-zero blocks of a disk as of a point: for each block, its newest
   * version at or before the point. Open points of the host always have a
   * larger id than its committed ones, so `point_id <= P` sees committed data only.
   */
  pointMap(pointId: number, diskId: number, fromBlock: number, limit: number): { blocks: number[]; ids: Buffer[]; next: number | null } {
    const rows = this.db.prepare(`
      SELECT block_index AS b, chunk_id AS id, MAX(point_id) FROM block_version
      WHERE disk_id = ? AND block_index >= ? AND point_id <= ?
      GROUP BY block_index ORDER BY block_index LIMIT ?`).all(diskId, fromBlock, pointId, limit + 1) as Array<{ b: number; id: Buffer | null }>;
    const next = rows.length > limit ? rows[limit]!.b : null;
    const blocks: number[] = [];
    const ids: Buffer[] = [];
    for (const row of rows.slice(0, limit)) {
      if (row.id === null) continue;
      blocks.push(row.b);
      ids.push(row.id);
    }
    return { blocks, ids, next };
  }

  // --- chunks -------------------------------------------------------------

  /** Asked for every chunk of every query and put: prepared once rather than per call. */
  private hasChunkStatement: Statement | null = null;
  private chunkLocationStatement: Statement | null = null;

  hasChunk(vaultId: string, id: Buffer): boolean {
    this.hasChunkStatement ??= this.db.prepare(`SELECT 1 FROM chunk WHERE vault = ${VAULT_NUMBER_OF} AND id = ?`);
    return this.hasChunkStatement.get(vaultId, id) !== undefined;
  }

  chunkLocation(vaultId: string, id: Buffer): ChunkLocation | undefined {
    this.chunkLocationStatement ??= this.db.prepare(`
      SELECT c.pack_id AS packId, p.file, c.offset, c.length FROM chunk c JOIN pack p ON p.id = c.pack_id
      WHERE c.vault = ${VAULT_NUMBER_OF} AND c.id = ?`);
    return this.chunkLocationStatement.get(vaultId, id) as ChunkLocation | undefined;
  }

  createPack(vaultId: string, file: string): number {
    return Number(this.db.prepare(`INSERT INTO pack (vault_id, file, size_bytes) VALUES (?, ?, 0)`).run(vaultId, file).lastInsertRowid);
  }

  /** Records chunks whose pack data is already fsynced (the commit-ordering rule, SPEC §5). */
  insertChunks(chunks: NewChunk[], packSizes: Map<number, number>): void {
    const insert = this.db.prepare(`INSERT OR IGNORE INTO chunk (vault, id, pack_id, offset, length) VALUES (?, ?, ?, ?, ?)`);
    const size = this.db.prepare(`UPDATE pack SET size_bytes = ? WHERE id = ?`);
    // Before the transaction: a number allotted in it would be gone if it rolled back.
    const numbers = new Map<string, number>();
    for (const c of chunks) if (!numbers.has(c.vaultId)) numbers.set(c.vaultId, this.vaultNumber(c.vaultId));
    this.db.transaction(() => {
      for (const c of chunks) insert.run(numbers.get(c.vaultId), c.id, c.packId, c.offset, c.length);
      for (const [packId, bytes] of packSizes) size.run(bytes, packId);
    }).immediate();
  }

  sealPack(packId: number): void {
    this.db.prepare(`UPDATE pack SET sealed = 1 WHERE id = ?`).run(packId);
  }

  /** At `serve` start: the packs of any earlier (dead) writer will never be appended to again. */
  sealAllPacks(): void {
    this.db.prepare(`UPDATE pack SET sealed = 1 WHERE sealed = 0`).run();
  }

  // --- forgetting (tidemark-receiver forget) ------------------------------

  /**
   * Removes every version of a host's disk (`diskName`), or everything of the host (null):
   * its disks, points, report and the host itself, so its credential stops working and its
   * name is free. Points left with no disk go too. Retention never drops a disk's last point,
   * so this is how a disk or host taken out of protection gives its space back; the chunks
   * only it used are freed by the next prune. One transaction.
   */
  forget(hostName: string, diskName: string | null, options: { dryRun?: boolean } = {}): ForgetReport {
    if (options.dryRun) {
      // The same work in a transaction rolled back: the report is what a real run would remove.
      this.db.exec('BEGIN IMMEDIATE');
      try {
        return this.forget(hostName, diskName);
      } finally {
        this.db.exec('ROLLBACK');
      }
    }
    return this.db.transaction(() => {
      const hostId = this.hostIdOf(hostName);
      const disks = this.db.prepare(`SELECT id, name FROM disk WHERE host_id = :host AND (:disk IS NULL OR name = :disk) ORDER BY name`)
        .all({ host: hostId, disk: diskName }) as Array<{ id: number; name: string }>;
      if (diskName !== null && disks.length === 0) {
        throw new TidemarkError('E_NOT_FOUND', `host ${hostName} has no disk named "${diskName}"; tidemark-receiver status lists its disks`);
      }
      let blockVersionsRemoved = 0;
      for (const disk of disks) {
        blockVersionsRemoved += this.db.prepare(`DELETE FROM block_version WHERE disk_id = ?`).run(disk.id).changes;
        this.db.prepare(`DELETE FROM point_disk WHERE disk_id = ?`).run(disk.id);
        this.db.prepare(`DELETE FROM disk WHERE id = ?`).run(disk.id);
      }
      // An open point stays while the host does: its agent commits it (or finds it discarded).
      const pointsRemoved = this.db.prepare(`
        DELETE FROM point WHERE host_id = :host AND (:disk IS NULL OR (state = 'committed'
          AND NOT EXISTS (SELECT 1 FROM point_disk pd WHERE pd.point_id = point.id)))`).run({ host: hostId, disk: diskName }).changes;
      if (diskName === null) {
        this.db.prepare(`DELETE FROM host_report WHERE host_id = ?`).run(hostId);
        this.db.prepare(`DELETE FROM host_revocation WHERE host_id = ?`).run(hostId);
        this.db.prepare(`DELETE FROM token WHERE host_id = ? AND used_ms IS NULL`).run(hostId); // its re-enrollment tokens
        this.db.prepare(`UPDATE token SET host_id = NULL WHERE host_id = ?`).run(hostId);
        this.db.prepare(`DELETE FROM host WHERE id = ?`).run(hostId);
      }
      return { host: hostName, disks: disks.map((d) => d.name), hostRemoved: diskName === null, pointsRemoved, blockVersionsRemoved };
    }).immediate();
  }

  // --- retention and garbage collection (receiver/prune.ts) ---------------

  hosts(): Array<{ id: number; name: string }> {
    return this.db.prepare(`SELECT id, name FROM host ORDER BY name`).all() as Array<{ id: number; name: string }>;
  }

  /** A host's committed points, oldest first, with the disks each lists. */
  committedPoints(hostId: number): Array<{ id: number; committedMs: number; timeMs: number; diskIds: number[] }> {
    const rows = this.db.prepare(`
      SELECT p.id, p.committed_ms AS committedMs, p.time_ms AS timeMs, json_group_array(pd.disk_id) FILTER (WHERE pd.disk_id IS NOT NULL) AS diskIds
      FROM point p LEFT JOIN point_disk pd ON pd.point_id = p.id
      WHERE p.host_id = ? AND p.state = 'committed' GROUP BY p.id ORDER BY p.id`)
      .all(hostId) as Array<{ id: number; committedMs: number; timeMs: number; diskIds: string }>;
    return rows.map((r) => ({ ...r, diskIds: JSON.parse(r.diskIds) as number[] }));
  }

  /**
   * Deletes point P, folding into each disk's kept point K (`into`: disk id →
   * K, the next kept point after P that lists the disk) the versions of that
   * disk K still needs: those with no newer version in (P, K]. Versions of a
   * disk `into` does not name go. One transaction: a crash leaves either P
   * whole or P gone and every K complete.
   */
  foldPoint(pointId: number, into: ReadonlyMap<number, number>): { foldedBlocks: number } {
    return this.db.transaction(() => {
      const dropSuperseded = this.db.prepare(`
        DELETE FROM block_version WHERE point_id = :p AND disk_id = :d
          AND EXISTS (SELECT 1 FROM block_version newer WHERE newer.disk_id = :d
                      AND newer.block_index = block_version.block_index AND newer.point_id > :p AND newer.point_id <= :k)`);
      const move = this.db.prepare(`UPDATE block_version SET point_id = :k WHERE point_id = :p AND disk_id = :d`);
      let folded = 0;
      for (const [d, k] of into) {
        dropSuperseded.run({ p: pointId, d, k });
        folded += move.run({ p: pointId, d, k }).changes;
        this.countChanges(k, d); // K now carries the changes since the disk's point before P
      }
      this.db.prepare(`DELETE FROM block_version WHERE point_id = ?`).run(pointId);
      this.db.prepare(`DELETE FROM point_disk WHERE point_id = ?`).run(pointId);
      this.db.prepare(`DELETE FROM point WHERE id = ? AND state = 'committed'`).run(pointId);
      return { foldedBlocks: folded };
    }).immediate();
  }

  /** Deletes chunk rows no block version references; returns what was freed. */
  deleteUnreferencedChunks(): { chunks: number; bytes: number } {
    return this.db.transaction(() => {
      this.db.exec(`
        CREATE TEMP TABLE IF NOT EXISTS referenced (vault INTEGER NOT NULL, id BLOB NOT NULL, PRIMARY KEY (vault, id)) WITHOUT ROWID;
        DELETE FROM temp.referenced;
        INSERT OR IGNORE INTO temp.referenced
          SELECT n.number, bv.chunk_id FROM block_version bv JOIN disk d ON d.id = bv.disk_id JOIN host h ON h.id = d.host_id
            JOIN vault_number n ON n.vault_id = h.vault_id
          WHERE bv.chunk_id IS NOT NULL;`);
      const dead = `NOT EXISTS (SELECT 1 FROM temp.referenced r WHERE r.vault = chunk.vault AND r.id = chunk.id)`;
      const freed = this.db.prepare(`SELECT COUNT(*) AS chunks, COALESCE(SUM(length), 0) AS bytes FROM chunk WHERE ${dead}`).get() as { chunks: number; bytes: number };
      this.db.prepare(`DELETE FROM chunk WHERE ${dead}`).run();
      this.db.exec(`DELETE FROM temp.referenced`);
      return freed;
    }).immediate();
  }

  /** Sealed packs with their live (still catalogued) entry bytes. */
  packUsage(): PackUsage[] {
    return (this.db.prepare(`
      SELECT p.id, p.vault_id AS vaultId, p.file, p.size_bytes AS sizeBytes, p.sealed,
        COALESCE(SUM(c.length), 0) AS liveEnvelopeBytes, COUNT(c.id) AS liveChunks
      FROM pack p LEFT JOIN chunk c ON c.pack_id = p.id GROUP BY p.id ORDER BY p.id`).all() as Array<Record<string, number | string>>)
      .map((r) => ({
        id: r.id as number, vaultId: r.vaultId as string, file: r.file as string, sizeBytes: r.sizeBytes as number,
        liveEnvelopeBytes: r.liveEnvelopeBytes as number, liveChunks: r.liveChunks as number, sealed: r.sealed === 1,
      }));
  }

  liveChunksOf(packId: number): Array<{ vaultId: string; id: Buffer; offset: number; length: number }> {
    return this.db.prepare(`
      SELECT n.vault_id AS vaultId, c.id, c.offset, c.length FROM chunk c JOIN vault_number n ON n.number = c.vault
      WHERE c.pack_id = ? ORDER BY c.offset`).all(packId) as Array<{ vaultId: string; id: Buffer; offset: number; length: number }>;
  }

  /** Points the copied chunks at their new pack and forgets the old one, atomically. */
  replacePack(oldPackId: number, newPackId: number, moved: Array<{ vaultId: string; id: Buffer; offset: number }>, newSizeBytes: number): void {
    this.db.transaction(() => {
      const move = this.db.prepare(`UPDATE chunk SET pack_id = ?, offset = ? WHERE vault = ${VAULT_NUMBER_OF} AND id = ? AND pack_id = ?`);
      for (const m of moved) move.run(newPackId, m.offset, m.vaultId, m.id, oldPackId);
      const left = this.db.prepare(`SELECT COUNT(*) FROM chunk WHERE pack_id = ?`).pluck().get(oldPackId) as number;
      if (left > 0) throw new TidemarkError('E_STORAGE', `pack ${oldPackId} still holds ${left} chunks after compaction; left in place`);
      this.db.prepare(`UPDATE pack SET size_bytes = ?, sealed = 1 WHERE id = ?`).run(newSizeBytes, newPackId);
      this.db.prepare(`DELETE FROM pack WHERE id = ?`).run(oldPackId);
    }).immediate();
  }

  deletePack(packId: number): void {
    this.db.transaction(() => {
      const left = this.db.prepare(`SELECT COUNT(*) FROM chunk WHERE pack_id = ?`).pluck().get(packId) as number;
      if (left === 0) this.db.prepare(`DELETE FROM pack WHERE id = ?`).run(packId);
    }).immediate();
  }

  packFiles(): Set<string> {
    return new Set(this.db.prepare(`SELECT file FROM pack`).pluck().all() as string[]);
  }

  // --- status -------------------------------------------------------------

  saveHostReport(hostId: number, r: HostReport): void {
    this.db.prepare(`INSERT OR REPLACE INTO host_report VALUES (?, ?, ?, ?, ?, ?, ?)`)
      .run(hostId, r.state, r.reason, r.tracker, r.backlogBytes, r.bytesPerSecond, Date.now());
  }

  /** Stored bytes of the distinct chunks a restore of the point reads (O(block versions of its host)). */
  referencedBytes(pointId: number): number {
    return this.db.prepare(`
      WITH newest AS (
        SELECT bv.chunk_id, MAX(bv.point_id) FROM block_version bv
        WHERE bv.disk_id IN (SELECT disk_id FROM point_disk WHERE point_id = :p) AND bv.point_id <= :p
        GROUP BY bv.disk_id, bv.block_index)
      SELECT COALESCE(SUM(c.length), 0) FROM chunk c
      WHERE c.vault = (SELECT n.number FROM point p JOIN host h ON h.id = p.host_id JOIN vault_number n ON n.vault_id = h.vault_id WHERE p.id = :p)
        AND c.id IN (SELECT chunk_id FROM newest WHERE chunk_id IS NOT NULL)`).pluck().get({ p: pointId }) as number;
  }

  status(): ReceiverStatus {
    const hosts = this.db.prepare(`SELECT h.id, h.name, h.vault_id AS vaultId, h.enrolled_ms AS enrolledMs, r.revoked_ms AS revokedMs
      FROM host h LEFT JOIN host_revocation r ON r.host_id = h.id ORDER BY h.name`).all() as
      Array<{ id: number; name: string; vaultId: string; enrolledMs: number; revokedMs: number | null }>;
    const lastPoint = this.db.prepare(`SELECT id, time_ms AS timeMs, crash_consistent AS cc FROM point WHERE host_id = ? AND state = 'committed' ORDER BY id DESC LIMIT 1`);
    const pointCount = this.db.prepare(`SELECT COUNT(*) FROM point WHERE host_id = ? AND state = 'committed'`).pluck();
    const openPoint = this.db.prepare(`SELECT id FROM point WHERE host_id = ? AND state = 'open'`).pluck();
    const disks = this.db.prepare(`SELECT name, size_bytes AS sizeBytes, block_bytes AS blockBytes FROM disk WHERE host_id = ? ORDER BY name`);
    const report = this.db.prepare(`SELECT state, reason, tracker, backlog_bytes AS backlogBytes, bytes_per_second AS bytesPerSecond, reported_ms AS reportedMs
      FROM host_report WHERE host_id = ?`);
    const now = Date.now();
    const stored = this.db.prepare(`SELECT COUNT(*) AS chunks, COALESCE(SUM(length), 0) AS bytes FROM chunk`).get() as { chunks: number; bytes: number };
    const packBytes = this.db.prepare(`SELECT COALESCE(SUM(size_bytes), 0) FROM pack`).pluck().get() as number;
    const blockVersions = this.db.prepare(`SELECT COUNT(*) FROM block_version`).pluck().get() as number;
    // The database's size as this snapshot sees it (WAL included): what catalog.db is once checkpointed.
    const catalogBytes = (this.db.pragma('page_count', { simple: true }) as number) * (this.db.pragma('page_size', { simple: true }) as number);
    return {
      hosts: hosts.map((h) => {
        const last = lastPoint.get(h.id) as { id: number; timeMs: number; cc: number } | undefined;
        const r = report.get(h.id) as (HostReport & { reportedMs: number }) | undefined;
        return {
          name: h.name,
          vaultId: h.vaultId,
          enrolledAt: new Date(h.enrolledMs).toISOString(),
          /** Set while the host's credential is revoked (until it enrolls again). */
          credentialRevokedAt: h.revokedMs === null ? null : new Date(h.revokedMs).toISOString(),
          // As the agent last reported it; reportedAt says how fresh that is.
          state: r?.state ?? (last ? 'Replicating' : 'Initialized'),
          reason: r?.reason ?? null,
          tracker: r?.tracker ?? null,
          backlogBytes: r?.backlogBytes ?? null,
          bytesPerSecond: r?.bytesPerSecond ?? null,
          reportedAt: r ? new Date(r.reportedMs).toISOString() : null,
          /** A point is open: a sync is under way (or was cut off and will be resumed). */
          syncing: openPoint.get(h.id) !== undefined,
          points: pointCount.get(h.id) as number,
          lastPoint: last ? { id: last.id, time: new Date(last.timeMs).toISOString(), crashConsistent: last.cc === 1 } : null,
          lagSeconds: last ? Math.max(0, (now - last.timeMs) / 1000) : null,
          disks: disks.all(h.id) as Array<{ name: string; sizeBytes: number; blockBytes: number }>,
          pointSpace: this.committedPoints(h.id).map((p) => ({ id: p.id, referencedBytes: this.referencedBytes(p.id) })),
        };
      }),
      storedChunks: stored.chunks,
      storedChunkBytes: stored.bytes,
      packBytes,
      blockVersions,
      catalogBytes,
    };
  }
}

export interface PackUsage {
  id: number;
  vaultId: string;
  file: string;
  sizeBytes: number;
  liveEnvelopeBytes: number;
  liveChunks: number;
  sealed: boolean;
}

export interface ReceiverStatus {
  hosts: Array<{
    name: string;
    vaultId: string;
    enrolledAt: string;
    credentialRevokedAt: string | null;
    state: HostState;
    reason: string | null;
    tracker: string | null;
    backlogBytes: number | null;
    bytesPerSecond: number | null;
    reportedAt: string | null;
    syncing: boolean;
    points: number;
    lastPoint: { id: number; time: string; crashConsistent: boolean } | null;
    lagSeconds: number | null;
    disks: Array<{ name: string; sizeBytes: number; blockBytes: number }>;
    /** Stored (compressed, encrypted) bytes each point needs for a restore. */
    pointSpace: Array<{ id: number; referencedBytes: number }>;
  }>;
  storedChunks: number;
  storedChunkBytes: number;
  packBytes: number;
  /** Rows of block_version: one per block per point that changed it. The catalog grows with these (SPEC §5.2). */
  blockVersions: number;
  catalogBytes: number;
}

/** What `tidemark-receiver forget` removed. */
export interface ForgetReport {
  host: string;
  /** The disks whose versions were removed. */
  disks: string[];
  hostRemoved: boolean;
  /** Committed points left with no disk (and, with the host, all of its points). */
  pointsRemoved: number;
  blockVersionsRemoved: number;
}

/** What an agent last said of itself (`status.report`, SPEC §3.4). */
export interface HostReport {
  state: HostState;
  reason: string | null;
  tracker: string | null;
  backlogBytes: number;
  bytesPerSecond: number;
}

/** Whether two block versions hold the same content (null: zeros). */
function sameContent(a: Buffer | null, b: Buffer | null): boolean {
  return a === null || b === null ? a === b : a.equals(b);
}
