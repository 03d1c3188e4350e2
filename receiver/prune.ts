// Prune (DESIGN §6–§7, SPEC §5.4): apply the retention policy, fold the block
// versions kept points still need, delete unreferenced chunks, and compact
// sealed packs that hold mostly dead data.
//
// Crash safety: each dropped point is folded in its own transaction; chunk rows
// go in one transaction; a compacted pack is copied and fsynced before the
// catalog points at the copy, and deleted only after. A SIGKILL anywhere
// leaves every kept point whole; at worst a pack file nobody references,
// which the next prune removes.
import { closeSync, fchownSync, fstatSync, fsyncSync, openSync, readdirSync, readSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { TidemarkError } from '../shared/errors.js';
import { fsyncDir, writeAllSync } from '../shared/fs-util.js';
import type { Logger } from '../shared/log.js';
import type { Catalog } from './catalog.js';
import { ENTRY_HEADER_BYTES, PACK_HEADER_BYTES, PACK_MAGIC, PACK_VERSION, encodeEntryHeader, entryIsIntact } from './pack-store.js';
import { decideRetention, type RetentionPolicy } from './retention.js';

/** Compact a sealed pack once less than this share of it is live. */
const COMPACT_BELOW_LIVE_RATIO = 0.5;
/** Pack files unknown to the catalog are removed only when this old (a writer may be creating one now). */
const ORPHAN_MIN_AGE_MS = 3_600_000;

export interface PruneOptions {
  policy: RetentionPolicy;
  nowMs: number;
  dryRun: boolean;
  log?: Logger;
}

export interface PruneReport {
  dryRun: boolean;
  now: string;
  policy: { keepWithinSeconds: number; keepHourly: number; keepDaily: number; keepWeekly: number };
  hosts: Array<{ host: string; kept: Array<{ id: number; committedAt: string; reasons: string[] }>; dropped: Array<{ id: number; committedAt: string }> }>;
  pointsDropped: number;
  chunksFreed: number;
  bytesFreed: number;
  packsCompacted: number;
  packBytesBefore: number;
  packBytesAfter: number;
}

export function prune(catalog: Catalog, packDir: string, opts: PruneOptions): PruneReport {
  const packBytesBefore = totalPackBytes(catalog);
  const report: PruneReport = {
    dryRun: opts.dryRun,
    now: new Date(opts.nowMs).toISOString(),
    policy: { keepWithinSeconds: opts.policy.keepWithinMs / 1000, keepHourly: opts.policy.keepHourly, keepDaily: opts.policy.keepDaily, keepWeekly: opts.policy.keepWeekly },
    hosts: [], pointsDropped: 0, chunksFreed: 0, bytesFreed: 0, packsCompacted: 0, packBytesBefore, packBytesAfter: packBytesBefore,
  };
  // A dry run does the same work inside one transaction and rolls it back.
  if (opts.dryRun) catalog.db.exec('BEGIN IMMEDIATE');
  try {
    for (const host of catalog.hosts()) {
      const points = catalog.committedPoints(host.id);
      const decision = decideRetention(points, opts.policy, opts.nowMs);
      const at = (id: number) => new Date(points.find((p) => p.id === id)!.committedMs).toISOString();
      report.hosts.push({
        host: host.name,
        kept: [...decision.keep].map(([id, reasons]) => ({ id, committedAt: at(id), reasons })).sort((a, b) => a.id - b.id),
        dropped: decision.drop.map((id) => ({ id, committedAt: at(id) })),
      });
      for (const dropped of decision.drop) {
        const point = points.find((p) => p.id === dropped)!;
        // Per disk, the next kept point that lists it: the last point of each disk is kept, so one exists.
        const into = new Map(point.diskIds.map((d) => [d, points.find((p) => p.id > dropped && decision.keep.has(p.id) && p.diskIds.includes(d))!.id]));
        if (foldIfStillCommitted(catalog, dropped, into)) report.pointsDropped++;
      }
    }
    const freed = catalog.deleteUnreferencedChunks();
    report.chunksFreed = freed.chunks;
    report.bytesFreed = freed.bytes;
  } finally {
    if (opts.dryRun) catalog.db.exec('ROLLBACK');
  }
  if (!opts.dryRun) {
    report.packsCompacted = compactPacks(catalog, packDir, opts.log);
    removeOrphanPacks(catalog, packDir, opts.nowMs, opts.log);
    report.packBytesAfter = totalPackBytes(catalog);
  }
  opts.log?.info({ pointsDropped: report.pointsDropped, chunksFreed: report.chunksFreed, bytesFreed: report.bytesFreed, packsCompacted: report.packsCompacted, dryRun: opts.dryRun }, 'prune finished');
  return report;
}

/**
 * Folds P into its kept points unless another prune (serve's schedule beside one run by hand, with
 * another policy or --now) has dropped either since this one decided: folding into a
 * vanished K would delete P's versions that K's own successor still needs.
 */
function foldIfStillCommitted(catalog: Catalog, pointId: number, into: ReadonlyMap<number, number>): boolean {
  const committed = catalog.db.prepare(`SELECT COUNT(*) FROM point WHERE id = ? AND state = 'committed'`).pluck();
  return catalog.db.transaction(() => {
    // Decided again at the next prune.
    if (![pointId, ...into.values()].every((id) => committed.get(id) === 1)) return false;
    catalog.foldPoint(pointId, into);
    return true;
  }).immediate();
}

function totalPackBytes(catalog: Catalog): number {
  return catalog.packUsage().reduce((sum, p) => sum + p.sizeBytes, 0);
}

function compactPacks(catalog: Catalog, packDir: string, log?: Logger): number {
  let compacted = 0;
  for (const pack of catalog.packUsage()) {
    if (!pack.sealed) continue;
    const liveBytes = pack.liveEnvelopeBytes + pack.liveChunks * ENTRY_HEADER_BYTES;
    // A pack with no live entry goes whatever its size: one opened for a write that failed (disk full) holds none.
    if (pack.liveChunks > 0 && liveBytes >= (pack.sizeBytes - PACK_HEADER_BYTES) * COMPACT_BELOW_LIVE_RATIO) continue;
    const oldPath = join(packDir, pack.file);
    if (pack.liveChunks > 0) {
      const file = join(pack.vaultId, `${Date.now().toString(36)}-${process.pid}-c${pack.id}.pack`);
      let copied: ReturnType<typeof copyLiveEntries>;
      try {
        copied = copyLiveEntries(catalog, pack.id, oldPath, join(packDir, file));
      } catch (err) {
        // Another prune (serve's schedule beside one run by hand) compacted it since this one looked.
        if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !catalog.packFiles().has(pack.file)) continue;
        throw err;
      }
      const { moved, sizeBytes } = copied;
      // The copy is durable before any row names it; a crash or a full disk before this
      // transaction leaves only an unreferenced file (step 4), never a row without its file.
      catalog.db.transaction(() => catalog.replacePack(pack.id, catalog.createPack(pack.vaultId, file), moved, sizeBytes)).immediate();
    } else {
      catalog.deletePack(pack.id);
    }
    rmSync(oldPath, { force: true });
    fsyncDir(dirname(oldPath));
    compacted++;
    log?.info({ pack: pack.file, liveChunks: pack.liveChunks }, 'pack compacted');
  }
  return compacted;
}

/** Copies the live entries of a pack into a new pack file, checking each as it goes; fsyncs it. */
function copyLiveEntries(catalog: Catalog, packId: number, fromPath: string, toPath: string) {
  const chunks = catalog.liveChunksOf(packId);
  const from = openSync(fromPath, 'r');
  const to = openSync(toPath, 'wx', 0o600);
  try {
    // A prune run by hand as root must not leave a pack the service's user cannot read.
    if (process.getuid?.() === 0) {
      const owner = fstatSync(from);
      fchownSync(to, owner.uid, owner.gid);
    }
    const header = Buffer.alloc(PACK_HEADER_BYTES);
    PACK_MAGIC.copy(header, 0);
    header[4] = PACK_VERSION;
    writeAllSync(to, [header], 0);
    let offset = PACK_HEADER_BYTES;
    const moved: Array<{ vaultId: string; id: Buffer; offset: number }> = [];
    for (const c of chunks) {
      const entry = Buffer.alloc(ENTRY_HEADER_BYTES + c.length);
      const read = readSync(from, entry, 0, entry.length, c.offset);
      if (read !== entry.length || !entryIsIntact(entry, c.id)) {
        // Never copy damage forward silently: leave this pack for verify to report.
        throw new TidemarkError('E_INTEGRITY', `chunk ${c.id.toString('hex')} in ${fromPath} at offset ${c.offset} is damaged; run tidemark-receiver verify`);
      }
      // Rewritten in this receiver's entry format: compaction upgrades a version 1 pack.
      const envelope = entry.subarray(ENTRY_HEADER_BYTES);
      writeAllSync(to, [encodeEntryHeader(c.id, envelope), envelope], offset);
      moved.push({ vaultId: c.vaultId, id: c.id, offset });
      offset += entry.length;
    }
    fsyncSync(to);
    fsyncDir(dirname(toPath));
    return { moved, sizeBytes: offset };
  } catch (err) {
    closeSync(to);
    rmSync(toPath, { force: true });
    throw err;
  } finally {
    closeSync(from);
    try {
      closeSync(to);
    } catch {
      /* already closed on the error path */
    }
  }
}

/** Pack files the catalog does not know: left by a crash between copy and catalog update. */
function removeOrphanPacks(catalog: Catalog, packDir: string, nowMs: number, log?: Logger): void {
  const known = catalog.packFiles();
  for (const vault of readdirSync(packDir, { withFileTypes: true })) {
    if (!vault.isDirectory()) continue;
    for (const name of readdirSync(join(packDir, vault.name))) {
      const file = join(vault.name, name);
      const path = join(packDir, file);
      if (!name.endsWith('.pack') || known.has(file) || nowMs - statSync(path).mtimeMs < ORPHAN_MIN_AGE_MS) continue;
      rmSync(path, { force: true });
      log?.warn({ pack: file }, 'removed a pack file the catalog does not reference');
    }
  }
}
