// The per-block CPU work of the agent, as plain functions over one range of
// blocks: the worker threads run them, and tests compare the pool's answers
// with a direct call. Scan results are packed in a few typed arrays so a worker
// hands them back by transfer rather than by a copy per block; envelopes are
// written into shared memory the caller provides.
import { xxh3, xxh64 } from '@node-rs/xxhash';
import { CHUNK_ID_BYTES, CHUNK_OVERHEAD_BYTES, chunkId, sealChunkParts, type ChunkKeys } from '../shared/chunk-crypto.js';
import { isZeroBlock } from '../shared/zero-block.js';

export interface ScanResult {
  /** blockHash of every block of the range. */
  hashes: BigUint64Array;
  /** Indices (within the range) of the blocks whose hash differs from `known`. */
  changed: Uint32Array;
  /** Per changed block: 1 when it is all zeros (never stored, no id). */
  zero: Uint8Array;
  /** Per changed block: its chunk id (32 bytes; all zero for a zero block). */
  ids: Uint8Array;
}

/**
 * The hash the agent keeps per block to notice change (SPEC §7): XXH64.
 * @node-rs/xxhash's XXH3 runs at ~2 GB/s here against ~15 GB/s for its XXH64,
 * so a hash scan of a mostly unchanged disk is spent mostly hashing.
 */
export function blockHash(block: Buffer): bigint {
  return xxh64(block);
}

/** What agents before the hash-file upgrade kept: XXH3-64. Only read to compare with a legacy hash file. */
export function legacyBlockHash(block: Buffer): bigint {
  return xxh3.xxh64(block);
}

/** `hash` of an all-zero block of a given size, computed once per size: zero blocks are never hashed. */
function zeroHashOf(hash: (block: Buffer) => bigint): (bytes: number) => bigint {
  const bySize = new Map<number, bigint>();
  return (bytes) => {
    let value = bySize.get(bytes);
    if (value === undefined) bySize.set(bytes, (value = hash(Buffer.alloc(bytes))));
    return value;
  };
}

export const zeroHash = zeroHashOf(blockHash);
const legacyZeroHash = zeroHashOf(legacyBlockHash);

export function blockOf(data: Buffer, index: number, blockBytes: number): Buffer {
  return data.subarray(index * blockBytes, Math.min((index + 1) * blockBytes, data.length));
}

export function blockCountOf(data: Buffer, blockBytes: number): number {
  return Math.ceil(data.length / blockBytes);
}

/**
 * Hashes every block; for each block whose hash differs from `known` (every
 * block when `known` is null) says whether it is zero and, if not, its chunk id.
 * The MAC is computed only for changed blocks: an incremental scan hashes a
 * whole disk but changes little. With `knownIsLegacy`, `known` holds legacy
 * hashes (a hash file written before the upgrade): blocks are compared by
 * those, and the hashes returned are the current ones all the same.
 */
export function scanBlocks(keys: Pick<ChunkKeys, 'idKey'>, data: Buffer, blockBytes: number, known: BigUint64Array | null, knownIsLegacy = false): ScanResult {
  const count = blockCountOf(data, blockBytes);
  if (known !== null && known.length !== count) throw new RangeError(`scan of ${count} blocks got ${known.length} known hashes`);
  const hashes = new BigUint64Array(count);
  const isZero = new Uint8Array(count);
  const changed: number[] = [];
  for (let i = 0; i < count; i++) {
    const block = blockOf(data, i, blockBytes);
    // A zero test is a memcmp, far cheaper than hashing: unused space costs almost nothing to scan.
    isZero[i] = isZeroBlock(block) ? 1 : 0;
    hashes[i] = isZero[i] ? zeroHash(block.length) : blockHash(block);
    const comparable = !knownIsLegacy ? hashes[i] : isZero[i] ? legacyZeroHash(block.length) : legacyBlockHash(block);
    if (known === null || comparable !== known[i]) changed.push(i);
  }
  const zero = new Uint8Array(changed.length);
  const ids = new Uint8Array(changed.length * CHUNK_ID_BYTES);
  changed.forEach((index, n) => {
    if (isZero[index]) zero[n] = 1;
    else ids.set(chunkId(keys, blockOf(data, index, blockBytes)), n * CHUNK_ID_BYTES);
  });
  return { hashes, changed: Uint32Array.from(changed), zero, ids };
}

/** Room for one block's envelope in a sealed output: the block and the envelope's fixed overhead. */
export function envelopeSlotBytes(blockBytes: number): number {
  return blockBytes + CHUNK_OVERHEAD_BYTES;
}

/**
 * Seals the named blocks (indices within `data`) under their ids (32 bytes
 * each, back to back), writing the nth envelope into `output` at slot
 * `slots[n]` (envelopeSlotBytes apart). Returns each envelope's length.
 */
export function sealBlocks(keys: ChunkKeys, data: Buffer, blockBytes: number, blocks: Uint32Array, ids: Uint8Array, output: Uint8Array, slots: Uint32Array): Uint32Array {
  if (ids.length !== blocks.length * CHUNK_ID_BYTES || slots.length !== blocks.length) {
    throw new RangeError(`seal of ${blocks.length} blocks got ${ids.length / CHUNK_ID_BYTES} ids and ${slots.length} slots`);
  }
  const slotBytes = envelopeSlotBytes(blockBytes);
  const lengths = new Uint32Array(blocks.length);
  blocks.forEach((index, n) => {
    if (index >= blockCountOf(data, blockBytes)) throw new RangeError(`block ${index} is outside the ${data.length}-byte range`);
    const slot = slots[n]! * slotBytes;
    if (slot + slotBytes > output.length) throw new RangeError(`slot ${slots[n]} is outside the ${output.length}-byte output`);
    const id = Buffer.from(ids.buffer, ids.byteOffset + n * CHUNK_ID_BYTES, CHUNK_ID_BYTES);
    let at = slot;
    for (const part of sealChunkParts(keys, id, blockOf(data, index, blockBytes))) {
      output.set(part, at);
      at += part.length;
    }
    lengths[n] = at - slot;
  });
  return lengths;
}
