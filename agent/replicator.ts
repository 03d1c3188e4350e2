// `tidemark-agent run` without --once: keep the receiver within seconds of
// the disks (SPEC §8.2). With tracefs, each interval ships the blocks the
// kernel saw written; without it, each interval is a hash-scan cycle.
// Retryable failures (receiver down, its disk full) back off and retry while
// tracking goes on; the dirty set persists, so no full sync is ever redone.
import { createHash } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { blockDeviceSizeBytes } from '../shared/block-device.js';
import { DiskReader } from '../shared/disk-reader.js';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { BlockPool } from './block-pool.js';
import { blockCountOf } from './block-work.js';
import { SlabPool, type Slab } from './slab-pool.js';
import { BatchWindow } from './batch-window.js';
import { DirtyMap } from './dirty-map.js';
import { describeProtectedDisk } from './disks.js';
import { HashFile, type AgentState, type DiskRecord } from './state.js';
import { reportStatus } from './status-report.js';
import { openSession, registerDisk, shipBlocks, shipTurns, syncOnce, type SyncResult, type Totals } from './sync.js';
import { TraceInstance, monotonicSeconds, tracefsUnavailableReason, type TraceTarget, type WriteKind } from './tracefs.js';

const MAX_ROUNDS = 12;
/** What a round may hold in memory before its consistency is known; beyond it, it ships as it reads. */
const ROUND_HOLD_BYTES = 16 * 1024 * 1024;
/** Bytes of dirty runs read at once, and scanned and uploaded together; the longest run. */
const MAX_GROUP_BYTES = 4 * 1024 * 1024;
/** Groups being packed, hashed or sealed at once. */
const GROUPS_IN_FLIGHT = 2;
/** Groups sent and awaiting the receiver's acks (see BatchWindow). */
const GROUPS_AWAITING_ACKS = 16;
const BACKGROUND_DRAIN_MS = 50;
/** trace_pipe prints event times in microseconds. */
const EVENT_TIME_RESOLUTION = 1e-6;

export interface ReplicatorOptions {
  state: AgentState;
  keys: VaultKeys;
  diskPaths: string[];
  blockBytes: number;
  bytesPerSecond: number;
  intervalMs: number;
  tracker: 'auto' | 'tracefs' | 'scan';
  /** Hash scans of image files read reflink clones where possible (SyncOptions.snapshot). */
  snapshot?: 'auto' | 'off';
  json: boolean;
  log: Logger;
  /** Workers to use; without one, replicate() starts its own for its whole run. */
  pool?: BlockPool;
}

export interface PointEvent extends Partial<SyncResult> {
  pointId: number;
  time: string;
  crashConsistent: boolean;
  tracker: 'tracefs' | 'scan';
  mode: 'initial' | 'incremental' | 'resync';
}

export async function replicate(options: ReplicatorOptions, onPoint: (p: PointEvent) => void): Promise<void> {
  // One set of workers for the life of the agent, closed however the loop ends.
  const pool = options.pool ?? new BlockPool(options.keys);
  try {
    await replicateWith({ ...options, pool }, onPoint);
  } finally {
    if (pool !== options.pool) await pool.close();
  }
}

async function replicateWith(opts: ReplicatorOptions & { pool: BlockPool }, onPoint: (p: PointEvent) => void): Promise<void> {
  const stop = stopSignal();
  const images = opts.diskPaths.filter((p) => !isBlockDevice(p));
  const unavailable = images.length > 0 ? `${images.join(', ')} ${images.length > 1 ? 'are image files' : 'is an image file'}` : tracefsUnavailableReason();
  if (opts.tracker === 'tracefs' && unavailable) throw new TidemarkError('E_USAGE', `--tracker tracefs: ${unavailable}; use --tracker scan`);
  if (opts.tracker === 'scan' || unavailable) {
    opts.state.saveStatus({ tracker: 'scan', reason: opts.tracker === 'scan' ? 'hash scan (--tracker scan)' : `hash scan: ${unavailable}` });
    return scanLoop(opts, stop, onPoint);
  }
  // A disk that changed size needs new dirty maps and trace filters: tracking starts again,
  // with a resync by hash scan at the new size (what is written meanwhile is then dirty).
  let rescanReason: string | null = null;
  for (;;) {
    const tracker = await TracefsReplicator.start(opts, onPoint, rescanReason);
    try {
      return await tracker.loop(stop);
    } catch (err) {
      if (!(err instanceof DisksChanged)) throw err;
      opts.log.warn({ reason: err.message }, 'a disk changed: tracking starts again, then a resync');
      rescanReason = err.message;
    } finally {
      tracker.close(true);
    }
  }
}

/** A protected disk is no longer what the tracker was built for (its size changed). */
class DisksChanged extends Error {}

function isBlockDevice(path: string): boolean {
  try {
    return statSync(path).isBlockDevice();
  } catch {
    return false;
  }
}

interface Stop {
  readonly stopped: boolean;
  sleep(ms: number): Promise<void>;
}

function stopSignal(): Stop {
  let stopped = false;
  let wake = () => {};
  const onSignal = () => {
    stopped = true;
    wake();
  };
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);
  return {
    get stopped() {
      return stopped;
    },
    sleep: (ms) => new Promise<void>((r) => {
      if (stopped) return r();
      const timer = setTimeout(r, ms);
      wake = () => {
        clearTimeout(timer);
        r();
      };
    }),
  };
}

/** Runs `cycle` every interval; retryable failures back off (1 s doubling to 60 s). */
async function everyInterval(opts: ReplicatorOptions, stop: Stop, cycle: () => Promise<void>): Promise<void> {
  let backoffMs = 1000;
  while (!stop.stopped) {
    const startedMs = Date.now();
    try {
      await cycle();
      backoffMs = 1000;
      await stop.sleep(Math.max(0, opts.intervalMs - (Date.now() - startedMs)));
    } catch (err) {
      if (err instanceof DisksChanged) throw err;
      const error = asTidemarkError(err, { stateDir: opts.state.dir });
      if (!error.retryable) throw error;
      try {
        opts.state.saveStatus({ state: 'Error', reason: `${error.message} (retrying in ${Math.round(backoffMs / 1000)} s)` });
      } catch {
        // A full state directory cannot take the status either: the log says it, and the retries go on.
      }
      opts.log.warn({ code: error.code, reason: error.message, retryInMs: backoffMs }, 'cycle failed; will retry');
      await stop.sleep(backoffMs);
      backoffMs = Math.min(backoffMs * 2, 60_000);
    }
  }
}

async function scanLoop(opts: ReplicatorOptions & { pool: BlockPool }, stop: Stop, onPoint: (p: PointEvent) => void): Promise<void> {
  await everyInterval(opts, stop, async () => {
    const r = await syncOnce({ ...opts, diskPaths: opts.diskPaths });
    onPoint({ ...r, tracker: 'scan', mode: r.initial ? 'initial' : 'incremental' });
  });
}

/** Blocks read, as runs of consecutive blocks. */
type Runs = Array<{ first: number; data: Buffer }>;

interface Tracked {
  record: DiskRecord;
  /** The disk's size when tracking started: the dirty maps and trace filter are made for it. */
  sizeBytes: number;
  blockCount: number;
  /** Written since the current cut. */
  pending: DirtyMap;
  /** The blocks being read in the current round. */
  reading: DirtyMap | null;
  /** Written before the cut but learned after it: still to be read in this round. */
  late: DirtyMap;
  /** Writes issued or completed after the cut, this round (monotonic s). */
  eventsAfterCut: Array<{ first: number; last: number; kind: WriteKind; at: number }>;
  /** Per block read this round: when its read started and ended (monotonic s). */
  readSpan: Map<number, [number, number]>;
  /** Everything not yet in a committed point: the persisted view. */
  unshipped: DirtyMap;
  touched: Set<number>;
}

class TracefsReplicator {
  private conn: ReceiverConnection | null = null;
  private needScan: string | null;
  private lostBaseline: number;
  private drainTimer: NodeJS.Timeout;
  /** Why the background drain stopped: the loop ends with it (tracking cannot go on unrecorded). */
  private drainFailure: TidemarkError | null = null;
  private readonly groupSlabs = new SlabPool(GROUPS_IN_FLIGHT, MAX_GROUP_BYTES);
  private readingFlag: string;

  private constructor(
    private readonly opts: ReplicatorOptions & { pool: BlockPool },
    private readonly instance: TraceInstance,
    private readonly disks: Tracked[],
    needScan: string | null,
    private readonly onPoint: (p: PointEvent) => void,
  ) {
    this.needScan = needScan;
    this.lostBaseline = instance.lostEvents();
    this.readingFlag = join(opts.state.dir, 'tracefs.reading');
    // Keep the kernel buffer drained between cycles, also while a scan or an outage lasts.
    this.drainTimer = setInterval(() => this.drainInBackground(), BACKGROUND_DRAIN_MS);
  }

  /** `rescanReason`: why tracking starts again (a disk changed), which calls for a resync. */
  static async start(opts: ReplicatorOptions & { pool: BlockPool }, onPoint: (p: PointEvent) => void, rescanReason: string | null = null): Promise<TracefsReplicator> {
    const { state } = opts;
    const infos = await Promise.all(opts.diskPaths.map((p) => describeProtectedDisk(p)));
    const targets: TraceTarget[] = infos.map((info) => {
      const [major, minor] = (info.parentDevMajorMinor ?? info.devMajorMinor!).split(':').map(Number) as [number, number];
      const blockBytes = state.disk(info.path)?.blockBytes ?? opts.blockBytes;
      return { dev: (major << 20) | minor, startSector: info.partitionStartSector, sectors: info.sizeBytes / 512, blockBytes };
    });
    const name = `tidemark-${createHash('sha256').update(resolve(state.dir)).digest('hex').slice(0, 12)}`;
    const instance = TraceInstance.open(name, targets);
    const saved = state.trackingState();
    const interrupted = readFlag(join(state.dir, 'tracefs.reading'));
    const disks: Tracked[] = infos.map((info, i) => {
      const record = state.disk(info.path);
      const blockCount = Math.ceil(info.sizeBytes / targets[i]!.blockBytes);
      const loaded = record ? DirtyMap.load(dirtyPath(state, record.diskId), blockCount) : null;
      return {
        record: record ?? { path: info.path, diskId: -1, sizeBytes: info.sizeBytes, blockBytes: targets[i]!.blockBytes, hasBaseline: false, baselinePointId: null, watermark: 0 },
        sizeBytes: info.sizeBytes,
        blockCount,
        pending: loaded ?? DirtyMap.empty(blockCount),
        reading: null,
        late: DirtyMap.empty(blockCount),
        eventsAfterCut: [],
        readSpan: new Map<number, [number, number]>(),
        unshipped: DirtyMap.empty(blockCount),
        touched: new Set<number>(),
      };
    });
    for (const d of disks) d.unshipped.or(d.pending);
    const continuity =
      // run removes its instance when it stops (SIGTERM/SIGINT) and forgets it; one recorded but gone went with a reboot.
      instance.fresh ? (saved === null
        ? 'tracking started: no tracefs instance was kept (the first run, or the agent was stopped: it removes its instance then)'
        : 'tracking restarted: the tracefs instance was gone (a reboot, or it was removed by hand)')
      : saved?.inode !== instance.inode() ? 'the tracefs instance is not the one this agent made'
      : interrupted ? 'the agent stopped while reading events'
      : disks.some((d) => DirtyMap.load(dirtyPath(state, d.record.diskId), d.blockCount) === null) ? 'no saved dirty map'
      : null;
    state.saveTrackingState({ instance: name, inode: instance.inode() });
    state.saveStatus({ tracker: 'tracefs', reason: continuity ? `kernel tracking; ${continuity}` : 'kernel tracking resumed from buffered events' });
    const needScan = disks.some((d) => !d.record.hasBaseline) ? 'initial'
      // Rounds compare with the shipped hashes and write into them: legacy ones must be replaced by a scan first.
      : disks.some((d) => state.legacyShippedPath(d.record) !== null) ? 'the hash files are upgraded from XXH3-64 to XXH64'
      : rescanReason ?? continuity;
    return new TracefsReplicator(opts, instance, disks, needScan, onPoint);
  }

  close(removeInstance: boolean): void {
    clearInterval(this.drainTimer);
    this.conn?.close();
    this.instance.close(removeInstance);
    if (removeInstance) this.opts.state.saveTrackingState(null);
  }

  async loop(stop: Stop): Promise<void> {
    await everyInterval(this.opts, stop, async () => {
      if (this.drainFailure) throw this.drainFailure;
      this.checkSizes();
      const lost = this.instance.lostEvents();
      if (lost > this.lostBaseline) {
        this.needScan = `tracking lost ${lost - this.lostBaseline} events (trace ring buffer overrun)`;
        this.lostBaseline = lost;
      }
      try {
        if (this.needScan) return await this.scan();
        await this.cycle().catch((err: unknown) => {
          this.requeueUncommitted();
          throw err;
        });
      } catch (err) {
        // The next try starts a new session, which registers the disks again: a disk the
        // receiver forgot comes back with a new id, and tracking starts again for it.
        this.conn?.close();
        throw err;
      }
    });
  }

  /** Throws DisksChanged when a disk's size is not the one tracking started with. */
  private checkSizes(): void {
    for (const d of this.disks) {
      const now = blockDeviceSizeBytes(d.record.path);
      if (now !== d.sizeBytes) throw new DisksChanged(`disk ${d.record.path} changed size from ${d.sizeBytes} to ${now} bytes`);
    }
  }

  /**
   * A cycle failed (receiver gone, disk full, ...) after its rounds took blocks out of
   * `pending`: everything no committed point holds yet is read again by the next one.
   */
  private requeueUncommitted(): void {
    for (const d of this.disks) {
      d.pending.or(d.unshipped);
      d.reading = null;
    }
  }

  /** The current cut, CLOCK_MONOTONIC seconds (comparable with event times). */
  private cutMonotonic = Infinity;

  private onWrite = (target: number, first: number, last: number, kind: WriteKind, atSeconds: number) => {
    const d = this.disks[target]!;
    const lastBlock = Math.min(last, d.blockCount - 1);
    d.pending.mark(first, lastBlock);
    d.unshipped.mark(first, lastBlock, d.touched);
    if (!d.reading) return;
    // Issued before the cut but read from the kernel after it: part of this point, still to be read.
    if (atSeconds <= this.cutMonotonic) return d.late.mark(first, lastBlock);
    d.eventsAfterCut.push({ first, last: lastBlock, kind, at: atSeconds });
  };

  /** Reads what the kernel has; a flag file brackets the read so that a kill inside it forces a rescan. */
  private drain(marker?: string): boolean {
    writeFileSync(this.readingFlag, '1');
    const seen = this.instance.drain(this.onWrite, marker);
    for (const d of this.disks) if (d.record.diskId >= 0) d.unshipped.saveBytes(dirtyPath(this.opts.state, d.record.diskId), d.touched);
    writeFileSync(this.readingFlag, '0');
    return seen;
  }

  /**
   * drain() from the timer, where a throw would escape every handler (and leave the trace
   * instance behind): the failure is kept for the loop, which ends the run with it.
   */
  private drainInBackground(): void {
    try {
      this.drain();
    } catch (err) {
      clearInterval(this.drainTimer);
      const error = asTidemarkError(err, { stateDir: this.opts.state.dir });
      this.drainFailure = error.code === 'E_INTERNAL' || error.code === 'E_DISK'
        ? new TidemarkError('E_STATE', `cannot record tracked writes in the state directory ${this.opts.state.dir} (${error.message}); if it was removed, enroll again into a new one`, { cause: err })
        : error;
    }
  }

  /** Returns once every event issued before now has been read from the kernel. */
  private async catchUp(): Promise<void> {
    const marker = this.instance.mark();
    const deadline = Date.now() + 10_000;
    while (!this.drain(marker)) {
      if (Date.now() > deadline) throw new TidemarkError('E_STATE', 'tracefs marker did not come back within 10 s');
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  /** Initial sync or resync by hash scan while tracking runs; what is written meanwhile is dirty. */
  private async scan(): Promise<void> {
    const mode = this.needScan === 'initial' ? 'initial' : 'resync';
    if (mode === 'resync') this.opts.state.saveStatus({ state: 'Resyncing', reason: this.needScan });
    this.opts.log.info({ reason: this.needScan }, mode === 'initial' ? 'initial sync' : 'resync by hash comparison');
    const r = await syncOnce({ ...this.opts });
    for (const d of this.disks) {
      d.record = this.opts.state.disk(d.record.path)!;
      d.unshipped.or(d.pending);
      d.unshipped.save(dirtyPath(this.opts.state, d.record.diskId));
    }
    this.needScan = null;
    this.opts.state.saveStatus({ tracker: 'tracefs', reason: null });
    this.onPoint({ ...r, tracker: 'tracefs', mode });
  }

  private async session(): Promise<ReceiverConnection> {
    if (this.conn?.isOpen) return this.conn;
    this.conn?.close();
    const conn = await openSession(this.opts.state, this.opts.keys, this.opts.bytesPerSecond);
    try {
      for (const d of this.disks) {
        const { stale, resumable } = await registerDisk(conn, this.opts.state, d.record.path, d.record.blockBytes, this.opts.log);
        if (stale) this.needScan = "the receiver's newest point is not the one this agent last committed";
        // Its size changed since checkSizes, or the receiver knows it by another id: its hashes are gone.
        else if (!resumable) throw new DisksChanged(`disk ${d.record.path} is not the one the receiver and this agent last agreed on (size or id changed)`);
      }
    } catch (err) {
      conn.close();
      throw err;
    }
    this.conn = conn;
    return conn;
  }

  /**
   * One recovery point. A round takes the cut T and at once reads the blocks
   * known dirty; then catches up with the kernel: blocks written before T but
   * not yet known are read too, and a block is clean unless a write to it was
   * issued after T and before its read ended. A clean round is the disks'
   * state at T; otherwise the next round cuts again (at most MAX_ROUNDS).
   */
  private async cycle(): Promise<void> {
    const { state } = this.opts;
    const startedMs = Date.now();
    const conn = await this.session();
    if (this.needScan) return; // the shipped hashes cannot be trusted: the next turn scans
    // After a restart mid-point the shipped hashes may lag the receiver: ship dirty blocks whatever their hash.
    const force = state.openPointId() !== null;
    const begun = await conn.request('point.begin', { resume: state.openPointId() });
    state.setOpenPointId(begun.pointId);
    const shippedHashes = this.disks.map(() => new Map<number, bigint>());
    const totals: Totals = { bytesRead: 0, blocksChanged: 0, chunksUploaded: 0, bytesUploaded: 0, chunksDeduplicated: 0 };
    const changedBytes = this.disks.map(() => 0);
    let consistent = false;
    let cutMs = 0;
    // Opened before the cut: opening probes the device, time that would widen the round.
    const readers = await Promise.all(this.disks.map((d) => DiskReader.open(d.record.path, MAX_GROUP_BYTES)));
    try {
      for (let round = 1; !consistent && round <= MAX_ROUNDS; round++) {
        this.drain();
        this.cutMonotonic = monotonicSeconds();
        cutMs = Date.now();
        const ship = async (i: number, runs: Runs) => {
          changedBytes[i] += await this.ship(conn, begun.pointId, this.disks[i]!, runs, shippedHashes[i]!, force, totals);
        };
        const held = await this.readRound(readers, totals, ship);
        const at = this.consistentInstant();
        consistent = at !== null;
        if (at !== null) cutMs = Math.round(Date.now() - (monotonicSeconds() - at) * 1000);
        for (const d of this.disks) d.reading = null;
        for (const [i, runs] of held.entries()) await ship(i, runs);
        // Not clean: what was written since T (the blocks that moved included) is read at the next cut,
        // and if no round is clean, by the next point.
      }
    } finally {
      await Promise.all(readers.map((r) => r.close()));
    }
    await conn.request('point.commit', {
      pointId: begun.pointId, timeMs: cutMs, crashConsistent: consistent,
      disks: this.disks.map((d, i) => ({ diskId: d.record.diskId, changedBytes: changedBytes[i]! })),
    });
    this.recordCommitted(shippedHashes, begun.pointId);
    const backlogBytes = this.disks.reduce((sum, d) => sum + d.pending.count() * d.record.blockBytes, 0);
    state.saveStatus({
      state: 'Replicating', tracker: 'tracefs',
      reason: consistent ? null : `point ${begun.pointId} is not crash-consistent: writes kept landing on the blocks being read`,
      lastPointId: begun.pointId, lastPointTimeMs: cutMs, lastPointConsistent: consistent, backlogBytes,
      progress: { bytesShipped: totals.bytesUploaded, durationMs: Date.now() - startedMs },
    });
    await reportStatus(conn, state);
    this.onPoint({ pointId: begun.pointId, time: new Date(cutMs).toISOString(), crashConsistent: consistent, tracker: 'tracefs', mode: 'incremental', ...totals, durationMs: Date.now() - startedMs });
  }

  /**
   * An instant T at which what this round read is the disks' state, or null.
   * T ≥ the cut. For a block read during [s, e]: a write issued in (cut, e]
   * may be in the read, so T must not precede its issue; a write completed at
   * or after s may be missing from it, so T must precede that completion. A
   * write completed after the cut to a block not read must not precede T
   * either (it would be missing). Writes in flight at T may be in or out.
   */
  private consistentInstant(): number | null {
    let lo = this.cutMonotonic;
    let hi = monotonicSeconds();
    for (const d of this.disks) {
      for (const e of d.eventsAfterCut) {
        for (let b = e.first; b <= e.last; b++) {
          const span = d.readSpan.get(b);
          // Event times are printed in whole microseconds, rounded down: take each as the latest it may be.
          if (e.kind === 'queue') {
            if (span && e.at <= span[1]) lo = Math.max(lo, e.at + EVENT_TIME_RESOLUTION);
          } else if (!span || e.at + EVENT_TIME_RESOLUTION > span[0]) {
            hi = Math.min(hi, e.at);
          }
        }
      }
    }
    return lo < hi ? lo : null;
  }

  /** The blocks to read in a round: all known dirty (`unshipped` keeps them until a point holding them commits). */
  private startRound(d: Tracked): DirtyMap {
    const taken = d.pending;
    d.pending = DirtyMap.empty(d.blockCount);
    d.reading = taken;
    d.late = DirtyMap.empty(d.blockCount);
    d.eventsAfterCut = [];
    d.readSpan.clear();
    return taken;
  }

  private takeLate(d: Tracked): DirtyMap | null {
    const late = d.late;
    if (late.count() === 0) return null;
    d.late = DirtyMap.empty(d.blockCount);
    d.reading!.or(late);
    return late;
  }

  /**
   * Reads the blocks known dirty at the cut, then catches up with the kernel and reads
   * the blocks written before the cut but learned only now, until none are left.
   * Returns what it read; beyond ROUND_HOLD_BYTES it ships as it reads (in block
   * order per disk, so a block read twice is staged newest last), which bounds
   * memory after an outage left much to read.
   */
  private async readRound(readers: DiskReader[], totals: Totals, ship: (disk: number, runs: Runs) => Promise<void>): Promise<Runs[]> {
    const held = this.disks.map((): Runs => []);
    let heldBytes = 0;
    let shipping = Promise.resolve();
    const keep = (disk: number, runs: Runs): Promise<void> => {
      held[disk]!.push(...runs);
      heldBytes += runs.reduce((sum, r) => sum + r.data.length, 0);
      if (heldBytes <= ROUND_HOLD_BYTES) return Promise.resolve();
      const taken = held.map((h) => h.splice(0));
      heldBytes = 0;
      shipping = shipping.then(async () => {
        for (const [i, runs] of taken.entries()) if (runs.length > 0) await ship(i, runs);
      });
      return shipping;
    };
    let toRead: Array<DirtyMap | null> = this.disks.map((d) => this.startRound(d));
    while (toRead.some((blocks) => blocks)) {
      await Promise.all(this.disks.map((d, i) => this.readBlocks(d, readers[i]!, toRead[i] ?? null, totals, (runs) => keep(i, runs))));
      // After the reads, not during them: the instant search needs every write issued before the last read ended.
      await this.catchUp();
      toRead = this.disks.map((d) => this.takeLate(d));
    }
    await shipping;
    return held;
  }

  /**
   * Reads the blocks in runs, a scratch buffer's worth at once (O_DIRECT for devices),
   * noting when each read started and ended; hands each batch to `keep` and waits on it.
   */
  private async readBlocks(d: Tracked, reader: DiskReader, blocks: DirtyMap | null, totals: Totals, keep: (runs: Runs) => Promise<void>): Promise<void> {
    if (!blocks) return;
    const { blockBytes, sizeBytes } = d.record;
    let batch: Array<{ first: number; position: number; length: number }> = [];
    let batchLength = 0;
    const readBatch = async () => {
      const ranges = batch;
      batch = [];
      batchLength = 0;
      const runs: Runs = [];
      await reader.readMany(ranges, (i, data, startedAt, endedAt) => {
        const { first } = ranges[i]!;
        for (let n = 0; n < blockCountOf(data, blockBytes); n++) d.readSpan.set(first + n, [startedAt, endedAt]);
        totals.bytesRead += data.length;
        runs.push({ first, data });
      }, monotonicSeconds);
      await keep(runs.sort((a, b) => a.first - b.first));
    };
    for (const [first, count] of blocks.runs(runBlocks(blockBytes))) {
      const length = Math.min(count * blockBytes, sizeBytes - first * blockBytes);
      if (batchLength + length > MAX_GROUP_BYTES) await readBatch();
      batch.push({ first, position: first * blockBytes, length });
      batchLength += length;
    }
    if (batch.length > 0) await readBatch();
  }

  /** Ships the blocks read whose content differs from what the receiver has. */
  private async ship(conn: ReceiverConnection, pointId: number, d: Tracked, runs: Runs, hashes: Map<number, bigint>, force: boolean, totals: Totals): Promise<number> {
    const { record } = d;
    const shipped = HashFile.open(this.opts.state.hashPath(record.diskId, 'shipped'));
    let changedBytes = 0;
    try {
      // Random writes leave many one-block runs: shipped one by one, each would cost several
      // round trips to the workers and the receiver. Runs go in groups, one scan and one upload
      // each; two groups packed, hashed or sealed at a time (their uploads in order), so one
      // hashes while the other uploads, and up to GROUPS_AWAITING_ACKS more sent and waiting
      // for the receiver's fsyncs. A group is packed only when its turn comes, and the runs it
      // took are dropped from `runs`, so a large dirty set is not held twice.
      const nextTurn = shipTurns();
      const shipGroup = async (group: RunGroup, slab: Slab): Promise<void> => {
        const known = new BigUint64Array(group.blocks.length);
        let at = 0;
        for (const run of group.runs) {
          const count = Math.ceil(run.length / record.blockBytes);
          known.set(shipped.read(run.first, count), at);
          at += count;
        }
        group.blocks.forEach((block, i) => (known[i] = hashes.get(block) ?? known[i]!));
        const turn = nextTurn();
        try {
          const scanned = await this.opts.pool.scan(group.data, record.blockBytes, force ? null : known);
          scanned.hashes.forEach((hash, i) => hashes.set(group.blocks[i]!, hash));
          if (scanned.changed.length > 0) {
            const shipment = await shipBlocks(conn, this.opts.pool, pointId, record, (i) => group.blocks[i]!, group.data, scanned, totals, turn);
            slab.release(); // every frame is in the connection's own memory now
            await shipment.acked;
            changedBytes += shipment.changedBytes; // after the await: groups finish in any order
          }
        } finally {
          turn.sent();
          slab.release();
        }
      };
      // A slab per group being packed, hashed or sealed: taking one waits while GROUPS_IN_FLIGHT are
      // out, and fixed shared buffers are not left for the workers' garbage collectors to free.
      const window = new BatchWindow(GROUPS_AWAITING_ACKS);
      while (runs.length > 0) {
        await window.room();
        const slab = await this.groupSlabs.acquire();
        if (window.failed) {
          slab.release();
          break;
        }
        window.add(shipGroup(takeGroup(runs, record.blockBytes, slab.buffer), slab));
      }
      await window.settle();
    } finally {
      shipped.close();
    }
    return changedBytes;
  }

  /** After the commit reply: shipped hashes first, then the dirty maps forget what the point holds. */
  private recordCommitted(shippedHashes: Array<Map<number, bigint>>, pointId: number): void {
    const { state } = this.opts;
    this.disks.forEach((d, i) => {
      const file = HashFile.open(state.hashPath(d.record.diskId, 'shipped'));
      try {
        for (const [block, hash] of shippedHashes[i]!) file.write(block, BigUint64Array.of(hash));
        file.sync();
      } finally {
        file.close();
      }
      d.record = { ...d.record, baselinePointId: pointId };
      state.saveDisk(d.record);
    });
    for (const d of this.disks) {
      d.unshipped = DirtyMap.empty(d.blockCount);
      d.unshipped.or(d.pending);
      d.unshipped.save(dirtyPath(state, d.record.diskId));
    }
    state.setOpenPointId(null);
  }
}

interface RunGroup {
  /** Where each run began and how many bytes it had. */
  runs: Array<{ first: number; length: number }>;
  /** The runs' data back to back, in shared memory for the workers. */
  data: Buffer;
  /** Disk block number of each block of `data`. */
  blocks: number[];
}

/**
 * Takes runs off the front of `runs` (at least one) into one group of at most
 * MAX_GROUP_BYTES, copied into `slab`. Only a group's last block may be short
 * (the disk's final block), so a run that ends short closes its group.
 */
function takeGroup(runs: Runs, blockBytes: number, slab: Buffer): RunGroup {
  let count = 0;
  let bytes = 0;
  while (count < runs.length && (count === 0 || bytes + runs[count]!.data.length <= MAX_GROUP_BYTES)) {
    bytes += runs[count]!.data.length;
    count++;
    if (runs[count - 1]!.data.length % blockBytes !== 0) break;
  }
  const taken = runs.splice(0, count);
  const data = slab.subarray(0, bytes);
  const blocks: number[] = [];
  let at = 0;
  for (const run of taken) {
    run.data.copy(data, at);
    at += run.data.length;
    for (let i = 0; i < Math.ceil(run.data.length / blockBytes); i++) blocks.push(run.first + i);
  }
  return { runs: taken.map((r) => ({ first: r.first, length: r.data.length })), data, blocks };
}

function dirtyPath(state: AgentState, diskId: number): string {
  return join(state.dir, 'hashes', `${diskId}.dirty`);
}

function readFlag(path: string): boolean {
  try {
    return readFileSync(path, 'utf8') === '1';
  } catch {
    return false;
  }
}

/** Blocks in the longest run read or grouped at once. */
function runBlocks(blockBytes: number): number {
  return Math.max(1, Math.floor(MAX_GROUP_BYTES / blockBytes));
}
