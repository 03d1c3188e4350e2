// The agent's per-block CPU work on every core: a WorkerPool running
// agent/block-worker.js, with each request split into one task per worker so
// that even a single batch (a continuous-mode round) uses all of them.
//
// Data lives in shared memory (SharedArrayBuffer): workers read the blocks
// where the disk reader put them, and the main thread still has them for the
// seal step that follows the receiver's dedup answer. Workers write envelopes
// into shared memory kept beside each data buffer; other results come back by
// transfer. Callers bound how much data is in flight (see agent/slab-pool.ts).
import { availableParallelism } from 'node:os';
import { CHUNK_ID_BYTES, type ChunkKeys } from '../shared/chunk-crypto.js';
import { WorkerPool } from '../shared/worker-pool.js';
import { blockCountOf, envelopeSlotBytes, type ScanResult } from './block-work.js';
import type { BlockTask } from './block-worker.js';

/** Below this many blocks a task is not worth splitting further. */
const MIN_BLOCKS_PER_TASK = 8;

export interface ScannedBlocks {
  /** blockHash of every block. */
  hashes: BigUint64Array;
  /** Indices of the blocks whose hash differed from what was known. */
  changed: number[];
  /** Per changed block: its chunk id, or null for an all-zero block. */
  ids: Array<Buffer | null>;
}

export class BlockPool {
  private readonly pool: WorkerPool;
  /** Per shared data buffer and block size, the memory its envelopes are sealed into (see seal). */
  private readonly sealedMemory = new WeakMap<SharedArrayBuffer, Map<number, Buffer>>();

  constructor(keys: ChunkKeys, size = availableParallelism()) {
    this.pool = new WorkerPool(new URL('./block-worker.js', import.meta.url), size, { idKey: keys.idKey, encRoot: keys.encRoot });
  }

  get size(): number {
    return this.pool.size;
  }

  /** A buffer in shared memory: handed to the workers without a copy. */
  static sharedBuffer(bytes: number): Buffer {
    return Buffer.from(new SharedArrayBuffer(bytes));
  }

  /** Hashes every block of `data`; ids for the blocks whose hash differs from `known` (all when null; see scanBlocks). */
  async scan(data: Buffer, blockBytes: number, known: BigUint64Array | null, knownIsLegacy = false): Promise<ScannedBlocks> {
    const shared = asShared(data);
    const count = blockCountOf(shared, blockBytes);
    const parts = this.split(count);
    const results = await Promise.all(parts.map(([from, to]) => this.pool.run<ScanResult>({
      op: 'scan',
      data: shared.subarray(from * blockBytes, Math.min(to * blockBytes, shared.length)),
      blockBytes,
      known: known === null ? null : known.slice(from, to),
      knownIsLegacy,
    } satisfies BlockTask)));
    const hashes = new BigUint64Array(count);
    const changed: number[] = [];
    const ids: Array<Buffer | null> = [];
    results.forEach((r, p) => {
      const from = parts[p]![0];
      hashes.set(r.hashes, from);
      r.changed.forEach((index, n) => {
        changed.push(from + index);
        ids.push(r.zero[n] ? null : Buffer.from(r.ids.buffer, r.ids.byteOffset + n * CHUNK_ID_BYTES, CHUNK_ID_BYTES));
      });
    });
    return { hashes, changed, ids };
  }

  /**
   * Seals the blocks at `blocks` (indices into `data`) under `ids`; envelopes in
   * the same order. The envelopes are views of shared memory that belongs to
   * `data`'s buffer, one slot per block position, so they stay valid until that
   * block of the buffer is sealed again: for a read slab, once the batch that
   * held it has been shipped and the slab reused. A fresh buffer per seal, left
   * for the main thread's garbage collector, cost full collections (see
   * shared/frame-ring.ts).
   */
  async seal(data: Buffer, blockBytes: number, blocks: number[], ids: Buffer[]): Promise<Buffer[]> {
    const shared = asShared(data);
    const { output, firstSlot } = this.sealedMemoryFor(shared, blockBytes);
    const parts = this.split(blocks.length);
    const results = await Promise.all(parts.map(([from, to]) => {
      const packedIds = new Uint8Array(CHUNK_ID_BYTES * (to - from));
      for (let i = from; i < to; i++) packedIds.set(ids[i]!, (i - from) * CHUNK_ID_BYTES);
      const taskBlocks = Uint32Array.from(blocks.slice(from, to));
      return this.pool.run<Uint32Array>(
        { op: 'seal', data: shared, blockBytes, blocks: taskBlocks, ids: packedIds, output, slots: taskBlocks.map((b) => firstSlot + b) } satisfies BlockTask,
        [packedIds.buffer],
      );
    }));
    const slotBytes = envelopeSlotBytes(blockBytes);
    const lengths = results.flatMap((r) => [...r]);
    return blocks.map((b, n) => {
      const at = (firstSlot + b) * slotBytes;
      return output.subarray(at, at + lengths[n]!);
    });
  }

  /** The memory `data`'s envelopes are sealed into, and the slot of its first block there: made once per buffer and block size. */
  private sealedMemoryFor(data: Buffer, blockBytes: number): { output: Buffer; firstSlot: number } {
    const slotBytes = envelopeSlotBytes(blockBytes);
    if (data.byteOffset % blockBytes !== 0) return { output: BlockPool.sharedBuffer(blockCountOf(data, blockBytes) * slotBytes), firstSlot: 0 };
    const memory = data.buffer as SharedArrayBuffer;
    let bySize = this.sealedMemory.get(memory);
    if (!bySize) this.sealedMemory.set(memory, (bySize = new Map()));
    let output = bySize.get(blockBytes);
    if (!output) bySize.set(blockBytes, (output = BlockPool.sharedBuffer(Math.ceil(memory.byteLength / blockBytes) * slotBytes)));
    return { output, firstSlot: data.byteOffset / blockBytes };
  }

  close(): Promise<void> {
    return this.pool.close();
  }

  /** [from, to) ranges, one per worker, none smaller than MIN_BLOCKS_PER_TASK unless there is only one. */
  private split(count: number): Array<[number, number]> {
    const parts = Math.max(1, Math.min(this.pool.size, Math.floor(count / MIN_BLOCKS_PER_TASK)));
    const per = Math.ceil(count / parts);
    const out: Array<[number, number]> = [];
    for (let from = 0; from < count; from += per) out.push([from, Math.min(count, from + per)]);
    return out;
  }
}

/** Data not already in shared memory is copied there once, so scan and seal tasks share it. */
function asShared(data: Buffer): Buffer {
  if (data.buffer instanceof SharedArrayBuffer) return data;
  const shared = BlockPool.sharedBuffer(data.length);
  data.copy(shared);
  return shared;
}
