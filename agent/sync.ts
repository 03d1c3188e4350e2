// One sync cycle by hash scan (SPEC §8): read every block of every protected
// disk, ship the blocks whose hash differs from what the last point holds,
// and commit one recovery point covering all disks.
//
// Crash consistency by convergence: a pass is trusted only if no disk was
// written while it ran (change counters equal before and after); otherwise
// another pass re-reads and ships what moved, up to MAX_PASSES, after which
// the point is committed flagged as *not* crash-consistent.
import { existsSync } from 'node:fs';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { Progress, ProgressReporter } from '../shared/progress.js';
import { MAX_IDS_PER_QUERY, SESSION_PATH } from '../shared/protocol.js';
import { changeCounters } from './change-counter.js';
import { snapshotImages } from './image-snapshot.js';
import { DiskReader } from '../shared/disk-reader.js';
import { blockCountOf, blockOf, zeroHash } from './block-work.js';
import { BlockPool, type ScannedBlocks } from './block-pool.js';
import { SlabPool } from './slab-pool.js';
import { BatchWindow } from './batch-window.js';
import { describeProtectedDisk } from './disks.js';
import { HashFile, type AgentState, type DiskRecord } from './state.js';
import { reportStatus } from './status-report.js';

const MAX_PASSES = 3;
/**
 * A cycle can lose a race with the receiver's garbage collection (SPEC §5.4): each prune
 * during a long sync may cost the batch in flight. A few tries in a row that get nowhere
 * end it; one that moved the resume watermark starts the count again.
 */
const MAX_FRUITLESS_ATTEMPTS = 3;
const READ_BATCH_BYTES = 4 * 1024 * 1024;
/** Batches read beyond one per worker: keeps the workers fed while a batch waits for the receiver's dedup answer; each costs a slab of memory. */
const READ_AHEAD_BATCHES = 1;
/** Batches sent and awaiting the receiver's acks (see BatchWindow): covers the fsyncs behind each ack. */
const BATCHES_AWAITING_ACKS = 16;
/** How often a pass persists its resume watermark (see ResumeWatermark). */
const WATERMARK_PERSIST_MS = 1000;
/** Hash of a block nobody has described yet: forces the block to be shipped. */
const UNKNOWN_HASH = 0n;

export interface SyncOptions {
  state: AgentState;
  keys: VaultKeys;
  diskPaths: string[];
  blockBytes: number;
  bytesPerSecond: number;
  json: boolean;
  log: Logger;
  /** Workers to use; without one, the sync starts its own and closes it. */
  pool?: BlockPool;
  /** auto (default): each pass reads reflink clones of the images where their filesystem can make them (agent/image-snapshot.ts). */
  snapshot?: 'auto' | 'off';
}

export interface SyncResult {
  pointId: number;
  time: string;
  crashConsistent: boolean;
  /** The last pass read reflink clones of the images (agent/image-snapshot.ts). */
  snapshot: boolean;
  initial: boolean;
  /** Continued a point an interrupted run had begun (its staged blocks were kept). */
  resumed: boolean;
  passes: number;
  bytesRead: number;
  blocksChanged: number;
  chunksUploaded: number;
  bytesUploaded: number;
  chunksDeduplicated: number;
  durationMs: number;
}

interface Target {
  record: DiskRecord;
  blockCount: number;
  changedBytes: number;
}

export interface Totals {
  bytesRead: number;
  blocksChanged: number;
  chunksUploaded: number;
  bytesUploaded: number;
  chunksDeduplicated: number;
}

/** Connects to the enrolled receiver and says hello: a session ready for requests. */
export async function openSession(state: AgentState, keys: VaultKeys, bytesPerSecond: number): Promise<ReceiverConnection> {
  const enrollment = state.enrollment()!;
  const conn = await ReceiverConnection.open({
    url: enrollment.receiverUrl,
    fingerprint: enrollment.fingerprint,
    path: SESSION_PATH,
    authorization: `Bearer ${state.credential()}`,
    bytesPerSecond,
  });
  try {
    await conn.hello({ vaultId: keys.vaultId, vaultProof: keys.vaultProof });
  } catch (err) {
    conn.close();
    throw err;
  }
  return conn;
}

export async function syncOnce(opts: SyncOptions): Promise<SyncResult> {
  const pool = opts.pool ?? new BlockPool(opts.keys);
  try {
    const progress = () => opts.diskPaths.map((path) => opts.state.disk(path)?.watermark ?? 0).join();
    for (let fruitless = 0; ;) {
      const before = progress();
      try {
        return await syncAttempt(opts, pool);
      } catch (err) {
        // Prune collected a chunk between our query and its blocks.put: resuming the open point ships it again.
        if (!(err instanceof TidemarkError && err.code === 'E_NOT_FOUND' && err.retryable)) throw err;
        fruitless = progress() === before ? fruitless + 1 : 1;
        if (fruitless >= MAX_FRUITLESS_ATTEMPTS) {
          throw new TidemarkError('E_NOT_FOUND', `${err.message} (the receiver's garbage collection removed chunks of ${fruitless} tries in a row; run again)`, { cause: err });
        }
        opts.log.info({ reason: err.message }, 'a chunk was collected by the receiver during the sync; resuming');
      }
    }
  } finally {
    if (pool !== opts.pool) await pool.close();
  }
}

async function syncAttempt(opts: SyncOptions, pool: BlockPool): Promise<SyncResult> {
  const startedMs = Date.now();
  const { state } = opts;
  const conn = await openSession(state, opts.keys, opts.bytesPerSecond);
  try {
    state.saveStatus({ state: 'Scanning', reason: 'reading disk geometry' });
    const registered = await Promise.all(opts.diskPaths.map((path) => registerDisk(conn, state, path, opts.blockBytes, opts.log)));
    const resume = state.openPointId();
    const begun = await conn.request('point.begin', { resume });
    for (const { target, fill, resumable } of registered) {
      if (begun.resumeCommitted && resumable) adoptCommittedPending(state, target.record, resume!);
      if (begun.resumed && resumable && existsSync(state.hashPath(target.record.diskId, 'pending'))) continue;
      target.record.watermark = 0;
      state.saveDisk(target.record);
      state.startPending(target.record, target.blockCount, target.record.hasBaseline ? UNKNOWN_HASH : fill);
    }
    const initial = registered.some((r) => !r.target.record.hasBaseline);
    state.setOpenPointId(begun.pointId);
    const targets = registered.map((r) => r.target);
    opts.log.info({ pointId: begun.pointId, resumed: begun.resumed, initial }, 'sync started');

    const totals: Totals = { bytesRead: 0, blocksChanged: 0, chunksUploaded: 0, bytesUploaded: 0, chunksDeduplicated: 0 };
    const paths = targets.map((t) => t.record.path);
    let consistent = false;
    let passes = 0;
    let cutMs = Date.now();
    let snapshotted = false;
    while (!consistent && passes < MAX_PASSES) {
      // A resumed first pass read part of the disks before the interruption: it cannot prove anything.
      const fromWatermark = passes === 0 && begun.resumed;
      const phase = initial ? (passes === 0 ? 'initial sync' : 'initial sync (converging)') : passes === 0 ? 'incremental sync' : 'incremental sync (converging)';
      state.saveStatus({ state: initial ? 'InitialSync' : 'Replicating', reason: phase });
      void reportStatus(conn, state);
      const snapshots = opts.snapshot === 'off' ? { unavailable: 'snapshots are off' } : await snapshotImages(paths);
      if ('unavailable' in snapshots) {
        if (passes === 0) opts.log.debug({ reason: snapshots.unavailable }, 'reading the live disks');
        const before = changeCounters(paths);
        await scanPass(conn, opts, pool, begun.pointId, targets, paths, passes === 0, fromWatermark, phase, totals);
        cutMs = Date.now();
        consistent = !fromWatermark && changeCounters(paths).every((c, i) => c === before[i]);
        snapshotted = false;
      } else {
        try {
          await scanPass(conn, opts, pool, begun.pointId, targets, snapshots.readPaths, passes === 0, fromWatermark, phase, totals);
        } finally {
          await snapshots.remove();
        }
        cutMs = snapshots.cutMs;
        consistent = !fromWatermark;
        snapshotted = true;
      }
      passes++;
    }

    await conn.request('point.commit', {
      pointId: begun.pointId, timeMs: cutMs, crashConsistent: consistent,
      disks: targets.map((t) => ({ diskId: t.record.diskId, changedBytes: t.changedBytes })),
    });
    for (const t of targets) {
      state.promotePending(t.record.diskId);
      state.saveDisk({ ...t.record, hasBaseline: true, baselinePointId: begun.pointId, watermark: 0 });
    }
    state.setOpenPointId(null);
    state.saveStatus({
      state: 'Replicating',
      reason: consistent ? null : `point ${begun.pointId} is not crash-consistent: the disks kept changing during ${passes} passes`,
      lastPointId: begun.pointId, lastPointTimeMs: cutMs, lastPointConsistent: consistent, backlogBytes: 0,
      progress: { bytesShipped: totals.bytesUploaded, durationMs: Date.now() - startedMs }, // as a tracefs cycle reports it
    });
    await reportStatus(conn, state);
    opts.log.info({ pointId: begun.pointId, crashConsistent: consistent, passes, ...totals }, 'point committed');
    return {
      pointId: begun.pointId, time: new Date(cutMs).toISOString(), crashConsistent: consistent, snapshot: snapshotted,
      initial, resumed: begun.resumed, passes, ...totals, durationMs: Date.now() - startedMs,
    };
  } finally {
    conn.close();
  }
}

/**
 * The point this agent was building (`pointId`) was committed, but the agent
 * stopped before recording it: its pending hashes describe that point exactly.
 */
function adoptCommittedPending(state: AgentState, record: DiskRecord, pointId: number): void {
  if (!state.adoptPending(record.diskId)) return;
  record.hasBaseline = true;
  record.baselinePointId = pointId;
  record.watermark = 0;
  state.saveDisk(record);
}

/**
 * Registers the disk and decides what its hashes can be trusted for. `stale`: the receiver's
 * newest point of the disk is neither the one the shipped hashes describe nor the open point
 * (whose pending hashes describe it): the state directory is older than the receiver (restored
 * from a backup or a snapshot of the host) or another agent replicated as this host. Comparing
 * with such hashes would leave blocks that are back to older content out of the next point,
 * silently; so the hashes are dropped and every block is compared with the receiver by id.
 */
export async function registerDisk(conn: ReceiverConnection, state: AgentState, path: string, blockBytes: number, log?: Logger) {
  const info = await describeProtectedDisk(path);
  const known = state.disk(path);
  const reg = await conn.request('disk.register', {
    name: path, sizeBytes: info.sizeBytes, sectorBytes: info.sectorBytes, blockBytes: known?.blockBytes ?? blockBytes,
  });
  const sameDisk = known !== undefined && known.diskId === reg.diskId && known.sizeBytes === info.sizeBytes;
  // lastPointId null: the receiver has no point of the disk (forgotten there); absent: a receiver before it.
  const stale = sameDisk && known.hasBaseline && known.baselinePointId !== null && reg.lastPointId !== undefined &&
    reg.lastPointId !== known.baselinePointId && (reg.lastPointId === null || reg.lastPointId !== state.openPointId());
  if (stale) {
    log?.warn({ disk: path, receiverPoint: reg.lastPointId, statePoint: known.baselinePointId }, reg.lastPointId === null
      ? 'the receiver has no point of the disk any more (forgotten there): comparing every block with the receiver'
      : "the receiver's newest point of the disk is not the one this state last committed (state restored from a backup, or another agent ran as this host): comparing every block with the receiver");
  }
  if (known && (!sameDisk || stale)) state.dropHashes(known.diskId);
  const record: DiskRecord = sameDisk && !stale
    ? known
    : { path, diskId: reg.diskId, sizeBytes: info.sizeBytes, blockBytes: known?.blockBytes ?? blockBytes, hasBaseline: false, baselinePointId: null, watermark: 0 };
  if (stale) state.saveDisk(record);
  const target: Target = { record, blockCount: Math.ceil(info.sizeBytes / record.blockBytes), changedBytes: 0 };
  // With no local baseline, the receiver's view is all zeros only if it has no history for the disk.
  const fill = reg.hasHistory ? UNKNOWN_HASH : zeroHash(record.blockBytes);
  return { target, fill, resumable: sameDisk && !stale, stale };
}

/** Reads each target from `readPaths` (the disks themselves, or clones of them). */
async function scanPass(
  conn: ReceiverConnection, opts: SyncOptions, pool: BlockPool, pointId: number, targets: Target[], readPaths: string[],
  firstPass: boolean, fromWatermark: boolean, phase: string, totals: Totals,
): Promise<void> {
  const start = (t: Target) => (fromWatermark ? t.record.watermark : 0);
  const progress = new Progress(phase, targets.reduce((sum, t) => sum + Math.max(0, t.record.sizeBytes - start(t) * t.record.blockBytes), 0));
  const reporter = new ProgressReporter(opts.json);
  let lastSavedMs = 0;
  const onBatchDone = (bytes: number) => {
    totals.bytesRead += bytes;
    progress.add(bytes);
    reporter.report(progress);
    if (Date.now() - lastSavedMs > 1000) {
      lastSavedMs = Date.now();
      const snapshot = progress.snapshot();
      opts.state.saveStatus({ progress: snapshot, backlogBytes: snapshot.bytesTotal - snapshot.bytesDone });
      void reportStatus(conn, opts.state);
    }
  };
  for (const [i, target] of targets.entries()) {
    // The first pass compares with the last point's hashes: legacy ones, if that is all the disk has.
    const legacyPath = firstPass ? opts.state.legacyShippedPath(target.record) : null;
    await scanDisk(conn, opts, pool, pointId, target, readPaths[i]!, start(target), legacyPath, totals, onBatchDone);
  }
  reporter.report(progress, true);
  reporter.done();
}

/**
 * One disk, as a pipeline of read batches: the next batches are read while
 * earlier ones are hashed and sealed on the workers and sent. A fixed set of
 * slabs bounds the batches being read, hashed and sealed; a batch gives its
 * slab back once sent, and a BatchWindow bounds those then awaiting the
 * receiver's acks, whose fsyncs would otherwise stall the pipeline. Batches
 * finish strictly in order, which the resume rule needs: a batch's blocks are
 * staged on the receiver, then its hashes are durable, then the watermark
 * moves past it.
 */
async function scanDisk(
  conn: ReceiverConnection, opts: SyncOptions, pool: BlockPool, pointId: number, target: Target, readPath: string, startBlock: number,
  legacyPath: string | null, totals: Totals, onBatchDone: (bytes: number) => void,
): Promise<void> {
  const { record } = target;
  const batchBlocks = Math.max(1, Math.floor(READ_BATCH_BYTES / record.blockBytes));
  const slabs = new SlabPool(pool.size + READ_AHEAD_BATCHES, batchBlocks * record.blockBytes);
  const hashes = HashFile.open(opts.state.hashPath(record.diskId, 'pending'));
  // Compared with instead of the pending hashes, which hold nothing of the last point yet (SPEC §7).
  let legacy: HashFile | undefined;
  const watermark = new ResumeWatermark(hashes, opts.state, record.path);
  const window = new BatchWindow(BATCHES_AWAITING_ACKS);
  let reader: DiskReader | undefined;
  try {
    legacy = legacyPath === null ? undefined : HashFile.open(legacyPath);
    // A clone (not the disk itself) sits in the image's directory, which others may write: a link
    // swapped in for it after it was made must not be followed (to another file, or a FIFO).
    reader = await DiskReader.open(readPath, batchBlocks * record.blockBytes, { noFollow: readPath !== record.path });
    let previous: Promise<void> = Promise.resolve();
    const nextTurn = shipTurns();
    for (let first = startBlock; first < target.blockCount && !window.failed; first += batchBlocks) {
      await window.room();
      const slab = await slabs.acquire();
      if (window.failed) {
        slab.release();
        break;
      }
      let data: Buffer;
      try {
        const count = Math.min(batchBlocks, target.blockCount - first);
        data = await reader.readInto(slab.buffer, first * record.blockBytes, Math.min(count * record.blockBytes, record.sizeBytes - first * record.blockBytes));
      } catch (err) {
        slab.release();
        throw err;
      }
      const batchFirst = first;
      const known = (legacy ?? hashes).read(batchFirst, blockCountOf(data, record.blockBytes));
      const before = previous;
      const turn = nextTurn();
      const batch = (async () => {
        try {
          const scanned = await pool.scan(data, record.blockBytes, known, legacy !== undefined);
          let acked = Promise.resolve();
          if (scanned.changed.length > 0) {
            const shipment = await shipBlocks(conn, pool, pointId, record, (i) => batchFirst + i, data, scanned, totals, turn);
            target.changedBytes += shipment.changedBytes;
            acked = shipment.acked;
          }
          turn.sent(); // nothing (more) to upload: the next batch may send while this one waits its turn below
          slab.release(); // every frame is in the connection's own memory now
          await acked;
          await before;
          hashes.write(batchFirst, scanned.hashes);
          watermark.advance(batchFirst + scanned.hashes.length);
          onBatchDone(data.length);
        } finally {
          turn.sent(); // also when nothing changed or the batch failed: the next batch must not wait forever
          slab.release();
        }
      })();
      // Stop reading at the first failure; later batches fail too (they wait on this one).
      window.add(batch);
      previous = batch;
    }
  } finally {
    // Every batch settles before the hash file closes, whatever failed; the batches done are kept for a resume.
    const failure = await window.settle().then(() => null, (reason: unknown) => ({ reason }));
    try {
      watermark.persist();
    } catch (err) {
      if (!failure) throw err; // the batch's own failure is the one to report
    } finally {
      hashes.close();
      legacy?.close();
      await reader?.close();
    }
    if (failure) throw failure.reason;
  }
}

/**
 * Where a resumed pass may start: past every batch whose blocks are staged on
 * the receiver and whose hashes are durable. Persisting costs an fsync of the
 * hash file and a commit of the state database, so it is done at most once a
 * second (and at the end); a crash re-reads at most that much.
 */
class ResumeWatermark {
  private done: number | null = null;
  private persistedMs = Date.now();

  constructor(private readonly hashes: HashFile, private readonly state: AgentState, private readonly path: string) {}

  /** Batches are done in order: every block before `block` is staged and its hash written. */
  advance(block: number): void {
    this.done = block;
    if (Date.now() - this.persistedMs >= WATERMARK_PERSIST_MS) this.persist();
  }

  persist(): void {
    if (this.done === null) return;
    this.hashes.sync(); // before the watermark moves past them
    this.state.setWatermark(this.path, this.done);
    this.done = null;
    this.persistedMs = Date.now();
  }
}

/** Keeps batches' uploads in order: a batch sends its chunks and block versions after the previous batch sent its own. */
export interface ShipTurn {
  /** Resolves when the previous batch has sent (not necessarily had acknowledged) its `blocks.put`. */
  after: Promise<void>;
  /** Called once this batch's `blocks.put` is sent, or it gave up (more calls do nothing). */
  sent: () => void;
}

/** Hands out turns in the order asked for: each one's `after` waits for the previous one's `sent`. */
export function shipTurns(): () => ShipTurn {
  let previousSent: Promise<void> = Promise.resolve();
  return () => {
    let sent!: () => void;
    const turn: ShipTurn = { after: previousSent, sent: () => sent() };
    previousSent = new Promise<void>((resolve) => (sent = resolve));
    return turn;
  };
}

/** A batch handed to the connection: its data may be reused; the receiver's acks are still to come. */
export interface Shipment {
  changedBytes: number;
  /** Settles once the receiver has stored every chunk and staged the block versions; rejects with the first refusal. */
  acked: Promise<void>;
}

/**
 * Ships the changed blocks of one batch: ask which chunks the vault lacks,
 * seal and upload those, then stage the block versions. `blockNumber` maps an
 * index into `data` to the disk block it holds. Resolves once every frame is
 * handed to the connection (which copies it), so the caller can reuse `data`
 * and its sealed envelopes while the acks travel; they are in `acked`.
 * Asking and sealing may run ahead of other batches; with a `turn`, uploads and
 * staging wait for the previous batch's, so batches complete in order, the
 * resume watermark keeps moving, and a block staged twice ends with its newer version.
 */
export async function shipBlocks(
  conn: ReceiverConnection, pool: BlockPool, pointId: number, record: DiskRecord,
  blockNumber: (index: number) => number, data: Buffer, scanned: Pick<ScannedBlocks, 'changed' | 'ids'>, totals: Totals, turn?: ShipTurn,
): Promise<Shipment> {
  try {
    const { changed, ids } = scanned;
    const unique = new Map<string, { id: Buffer; index: number }>();
    let changedBytes = 0;
    changed.forEach((index, n) => {
      changedBytes += blockOf(data, index, record.blockBytes).length;
      const id = ids[n];
      if (id) unique.set(id.toString('hex'), { id, index });
    });
    const candidates = [...unique.values()];
    const uploads: Array<{ id: Buffer; envelope: Buffer }> = [];
    for (let from = 0; from < candidates.length; from += MAX_IDS_PER_QUERY) {
      const slice = candidates.slice(from, from + MAX_IDS_PER_QUERY);
      const { missing } = await conn.request('chunks.query', { ids: slice.map((c) => c.id) });
      totals.chunksDeduplicated += slice.length - missing.length;
      const wanted = missing.map((index) => {
        const chunk = slice[index];
        if (!chunk) throw new TidemarkError('E_PROTOCOL', `receiver named chunk ${index} of a query of ${slice.length}`);
        return chunk;
      });
      const envelopes = await pool.seal(data, record.blockBytes, wanted.map((c) => c.index), wanted.map((c) => c.id));
      wanted.forEach((c, n) => uploads.push({ id: c.id, envelope: envelopes[n]! }));
    }
    await turn?.after;
    const replies: Array<Promise<unknown>> = [];
    let refused: { error: unknown } | undefined;
    for (const { id, envelope } of uploads) {
      if (refused) throw refused.error; // e.g. the receiver's disk is full: stop uploading
      const { reply } = await conn.send('chunk.put', { id, data: envelope });
      const stored = reply.then(() => {
        totals.chunksUploaded++;
        totals.bytesUploaded += envelope.length;
      });
      // Handled at once: a refusal that arrives while a later send waits for room must not go unhandled.
      stored.catch((error: unknown) => (refused ??= { error }));
      replies.push(stored);
    }
    // Sent right behind the chunks, without waiting for their acks: the receiver stages it once
    // every chunk sent before it is stored. Staging is in turn too: a block read twice
    // (continuous mode re-reads late writes) must have its newer version staged last.
    const staged = await conn.send('blocks.put', { pointId, diskId: record.diskId, blocks: changed.map(blockNumber), ids });
    turn?.sent();
    const acked = (async () => {
      // A refused chunk fails the blocks.put behind it too ("chunk not stored"); when both replies
      // arrive together, the refusal is the cause to report (e.g. the receiver's disk is full).
      const outcomes = await Promise.allSettled([...replies, staged.reply]);
      const failure = outcomes.find((o): o is PromiseRejectedResult => o.status === 'rejected');
      if (failure) throw failure.reason;
      totals.blocksChanged += changed.length;
    })();
    acked.catch(() => {}); // the caller awaits it later; a rejection before then is not unhandled
    return { changedBytes, acked };
  } finally {
    turn?.sent();
  }
}
