// `tidemark-restore verify --read-data` (docs/SPEC.md §5.3): the check with
// the key, on the client — the receiver never holds it. For every committed
// point the credential may read, page through each disk's block map, fetch
// every distinct chunk once and open it (GCM tag, keyed id, size). Unlike the
// receiver's key-less verify this also catches an envelope whose checksum was
// rewritten to match, or a chunk swapped under another id.
import { openChunk, type VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
import { printJson, printable } from '../shared/cli-util.js';
import { Progress, ProgressReporter } from '../shared/progress.js';
import type { PointInfo, Reply } from '../shared/protocol.js';
import { formatBytes } from '../shared/units.js';
import { ChunkFetcher } from './chunk-fetcher.js';
import { mapPage, stillListed } from './point-blocks.js';

/** Chunks fetched and opened at once: enough to fill a few chunks.get batches. */
const FETCH_CONCURRENCY = 64;
/** Codes that mean "this chunk is bad" rather than "the check could not run". */
const DAMAGE_CODES = new Set(['E_INTEGRITY', 'E_NOT_FOUND', 'E_PROTOCOL']);

export const READ_DATA_REQUIRED =
  'tidemark-restore verify fetches and decrypts every chunk: pass --read-data. ' +
  'The check without the key is tidemark-receiver verify --data DIR, run on the receiver';

export interface AffectedPoint {
  host: string;
  pointId: number;
  disk: string;
}

export interface ChunkDamage {
  kind: 'chunk';
  chunkId: string;
  message: string;
  affectedPoints: AffectedPoint[];
}

export interface RestoreVerifyReport {
  ok: boolean;
  pointsChecked: number;
  disksChecked: number;
  /** Distinct chunks fetched and opened. */
  chunksChecked: number;
  bytesFetched: number;
  /** Points listed at the start that the receiver's prune removed before their check ended: not checked, not damage. */
  pointsPruned: number;
  damaged: ChunkDamage[];
}

interface DamageEntry {
  chunkId: string;
  message: string;
  /** The fetch said E_NOT_FOUND: prune may have freed it since a point that is now gone named it. */
  notFound: boolean;
  refs: Map<string, AffectedPoint>;
}

class PointPruned extends Error {}

/** Damaged chunks are marked with this length in the seen-map. */
const DAMAGED = -1;

export async function verifyPoints(conn: ReceiverConnection, keys: VaultKeys, points: PointInfo[]): Promise<RestoreVerifyReport> {
  const report: RestoreVerifyReport = { ok: false, pointsChecked: 0, disksChecked: 0, chunksChecked: 0, bytesFetched: 0, pointsPruned: 0, damaged: [] };
  // Chunk id (32 bytes as a latin1 string, compact) → plaintext length, or DAMAGED.
  const seen = new Map<string, number>();
  const damaged = new Map<string, DamageEntry>();
  const checked = new Set<string>();
  const pruned = new Set<string>();
  const markDamaged = (key: string, message: string, notFound = false) => {
    if (!damaged.has(key)) damaged.set(key, { chunkId: Buffer.from(key, 'latin1').toString('hex'), message, notFound, refs: new Map() });
  };
  const progress = new Progress('verify', points.reduce((sum, p) => sum + p.disks.reduce((s, d) => s + d.sizeBytes, 0), 0));
  const reporter = new ProgressReporter(false); // stderr on a TTY only: stdout carries the report

  const checkPoint = async (point: PointInfo): Promise<void> => {
    for (const disk of point.disks) {
      const blockCount = Math.ceil(disk.sizeBytes / disk.blockBytes);
      const ref: AffectedPoint = { host: point.host, pointId: point.id, disk: disk.name };
      const refKey = `${point.host}\0${point.id}\0${disk.name}`;
      const fetcher = new ChunkFetcher(conn, disk.blockBytes, report);
      let from: number | null = 0;
      while (from !== null && from < blockCount) {
        const page: Reply<'point.map'> = await mapPage(conn, point, disk, from).catch(async (err: unknown) => {
          if (asTidemarkError(err).code === 'E_NOT_FOUND' && conn.isOpen && !(await stillListed(conn, point))) throw new PointPruned();
          throw err;
        });
        // Blocks past the end belong to a time the disk was larger: restore ignores them, so does verify.
        const blocksByKey = new Map<string, number[]>();
        page.ids.forEach((id, i) => {
          const block = page.blocks[i]!;
          if (block >= blockCount) return;
          const key = id.toString('latin1');
          const blocks = blocksByKey.get(key);
          if (blocks) blocks.push(block);
          else blocksByKey.set(key, [block]);
        });
        const unseen = [...blocksByKey.keys()].filter((key) => !seen.has(key));
        await runWithConcurrency(unseen, FETCH_CONCURRENCY, async (key) => {
          const id = Buffer.from(key, 'latin1');
          try {
            seen.set(key, openChunk(keys, id, await fetcher.get(id), disk.blockBytes).length);
          } catch (err) {
            const error = asTidemarkError(err);
            if (!DAMAGE_CODES.has(error.code) || !conn.isOpen) throw error;
            seen.set(key, DAMAGED);
            markDamaged(key, error.message, error.code === 'E_NOT_FOUND');
          } finally {
            report.chunksChecked++;
          }
        });
        for (const [key, blocks] of blocksByKey) {
          const length = seen.get(key)!;
          if (length === DAMAGED) {
            damaged.get(key)!.refs.set(refKey, ref);
            continue;
          }
          // As restore does: the plaintext must fill the block exactly (a short last block included).
          const bad = blocks.find((b) => length !== Math.min(disk.blockBytes, disk.sizeBytes - b * disk.blockBytes));
          if (bad !== undefined) {
            markDamaged(key, `chunk ${Buffer.from(key, 'latin1').toString('hex')} has ${length} bytes, not the size of block ${bad} of disk ${disk.name}`);
            damaged.get(key)!.refs.set(refKey, ref);
          }
        }
        const to: number = page.next === null ? blockCount : Math.min(page.next, blockCount);
        progress.add(Math.max(0, Math.min(disk.sizeBytes, to * disk.blockBytes) - from * disk.blockBytes));
        reporter.report(progress);
        from = page.next;
      }
      report.disksChecked++;
    }
  };

  for (const point of points) {
    try {
      await checkPoint(point);
      checked.add(`${point.host}\0${point.id}`);
    } catch (err) {
      if (!(err instanceof PointPruned)) throw err;
      pruned.add(`${point.host}\0${point.id}`);
    }
  }
  reporter.report(progress, true);
  reporter.done();
  // A chunk not found is damage only if a point that still exists reads it: prune frees the chunks
  // of the points it drops, also ones this run listed before the drop.
  const gone = new Map<string, boolean>();
  for (const entry of damaged.values()) {
    if (!entry.notFound) continue;
    for (const [refKey, ref] of entry.refs) {
      const pointKey = `${ref.host}\0${ref.pointId}`;
      if (!gone.has(pointKey)) {
        const point = points.find((p) => p.host === ref.host && p.id === ref.pointId)!;
        gone.set(pointKey, !(await stillListed(conn, point)));
      }
      if (gone.get(pointKey)) {
        entry.refs.delete(refKey);
        pruned.add(pointKey);
      }
    }
    if (entry.refs.size === 0) damaged.delete(Buffer.from(entry.chunkId, 'hex').toString('latin1'));
  }
  report.pointsPruned = pruned.size;
  report.pointsChecked = [...checked].filter((k) => !pruned.has(k)).length;
  report.damaged = [...damaged.values()].map((d) => ({
    kind: 'chunk' as const,
    chunkId: d.chunkId,
    message: d.message,
    affectedPoints: [...d.refs.values()].sort((a, b) => a.host.localeCompare(b.host) || a.pointId - b.pointId || a.disk.localeCompare(b.disk)),
  }));
  report.ok = report.damaged.length === 0;
  return report;
}

/** The CLI command: prints the report (human lines or one JSON document); E_INTEGRITY when anything is damaged. */
export async function runRestoreVerify(conn: ReceiverConnection, keys: VaultKeys, points: PointInfo[], opts: { json?: boolean; host?: string }): Promise<void> {
  if (opts.host !== undefined && points.length === 0) {
    throw new TidemarkError('E_NOT_FOUND', `host ${opts.host} has no committed point that this credential may read`);
  }
  const report = await verifyPoints(conn, keys, points);
  if (opts.json) printJson(report);
  else {
    for (const d of report.damaged) {
      process.stdout.write(`DAMAGED chunk ${d.chunkId}: ${printable(d.message)}\n`); // may be the receiver's words
      for (const line of describeAffected(d.affectedPoints)) process.stdout.write(`  breaks restore of ${line}\n`);
    }
    if (report.pointsPruned > 0) process.stdout.write(`${report.pointsPruned} point(s) listed at the start were pruned by the receiver meanwhile: not checked\n`);
    process.stdout.write(`checked ${report.pointsChecked} points (${report.disksChecked} disks), ${report.chunksChecked} distinct chunks, ` +
      `${formatBytes(report.bytesFetched)} fetched: ${report.ok ? 'every chunk authentic' : `${report.damaged.length} damaged`}\n`);
  }
  if (!report.ok) {
    const points = new Set(report.damaged.flatMap((d) => d.affectedPoints.map((a) => `${a.host}:${a.pointId}`)));
    throw new TidemarkError('E_INTEGRITY',
      `verify found ${report.damaged.length} damaged chunk${report.damaged.length > 1 ? 's' : ''} (first: ${report.damaged[0]!.chunkId}) ` +
      `affecting ${points.size} recovery point${points.size === 1 ? '' : 's'}`);
  }
}

function describeAffected(affected: AffectedPoint[]): string[] {
  const groups = new Map<string, { host: string; disk: string; points: number[] }>();
  for (const a of affected) {
    const key = `${a.host}\0${a.disk}`;
    const group = groups.get(key) ?? { host: a.host, disk: a.disk, points: [] };
    group.points.push(a.pointId);
    groups.set(key, group);
  }
  return [...groups.values()].map((g) => `host ${printable(g.host)} disk ${printable(g.disk)}: point${g.points.length > 1 ? 's' : ''} ${g.points.join(', ')}`);
}

async function runWithConcurrency<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}
