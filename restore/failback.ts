// Failback: bring an existing disk (block device, or image file at least as
// large as the disk) back to a recovery point by writing only the blocks
// that differ. Each block of the target is read (block devices with O_DIRECT,
// shared/disk-reader.ts), its keyed chunk id computed (on the agent's block
// pool, agent/block-pool.ts: the hashing is most of the work) and compared with the
// point's block map; only differing blocks are fetched and written, in place,
// neighbours gathered into one write (restore/run-writer.ts).
// An all-zero block matches a block the map lacks. Interrupted, the target is
// a mix of old and new blocks; running failback again finishes the job.
import { open, stat } from 'node:fs/promises';
import { blockDeviceSizeBytes, openDeviceForWriting } from '../shared/block-device.js';
import { BlockPool } from '../agent/block-pool.js';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { DiskReader } from '../shared/disk-reader.js';
import { TidemarkError } from '../shared/errors.js';
import { Progress, ProgressReporter } from '../shared/progress.js';
import type { PointInfo } from '../shared/protocol.js';
import { findDisk, readPointBlocks, type MapBlock, type PointDisk } from './point-blocks.js';
import type { RestoreDiskResult } from './restore-disk.js';
import { RunWriter } from './run-writer.js';

const READ_BATCH_BYTES = 16 * 1024 * 1024;
/** O_DIRECT reads must be whole logical sectors: lengths are rounded up to this (within the target). */
const DIRECT_IO_ALIGN = 4096;

export interface FailbackResult extends RestoreDiskResult {
  /** Bytes of the target read to compare. */
  bytesRead: number;
  blocksWritten: number;
}

export async function failbackDisk(conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, diskName: string, to: string): Promise<FailbackResult> {
  const disk = findDisk(point, diskName);
  const targetBytes = await targetSizeBytes(to);
  if (targetBytes < disk.sizeBytes) {
    throw new TidemarkError('E_DISK', `${to} has ${targetBytes} bytes, fewer than the disk's ${disk.sizeBytes} at point ${point.id}; failback needs a target at least that large`);
  }
  const pool = new BlockPool(keys);
  const reader = await DiskReader.open(to, READ_BATCH_BYTES + DIRECT_IO_ALIGN).catch(async (err: unknown) => {
    await pool.close();
    throw new TidemarkError('E_DISK', `cannot read ${to}: ${(err as Error).message}`, { cause: err });
  });
  const result: FailbackResult = {
    point: point.id, disk: diskName, to, sizeBytes: disk.sizeBytes,
    bytesWritten: 0, bytesFetched: 0, blocksCompared: 0, bytesRead: 0, blocksWritten: 0,
  };
  const progress = new Progress(`failback ${diskName}`, disk.sizeBytes);
  const reporter = new ProgressReporter(false);
  try {
    const file = (await stat(to)).isBlockDevice() ? await openDeviceForWriting(to) : await open(to, 'r+');
    try {
      const targetIds = new TargetBlockIds(reader, pool, disk, targetBytes);
      const zeros = Buffer.alloc(disk.blockBytes);
      // The predicate runs in block order, ahead of the writes below, but never
      // reads a block after it was written: each block is read once, then written at most once.
      const differs = async (block: MapBlock) => {
        const currentId = await targetIds.idOf(block);
        result.blocksCompared++;
        if (currentId === null) return block.id !== null; // an all-zero block
        return block.id === null || !currentId.equals(block.id);
      };
      const writer = new RunWriter(file);
      for await (const block of readPointBlocks(conn, keys, point, disk, result, { everyBlock: true, want: differs })) {
        if (block.wanted) {
          const data = block.data ?? zeros.subarray(0, block.length);
          await writer.write(data, block.offset);
          result.bytesWritten += data.length;
          result.blocksWritten++;
        }
        progress.add(block.offset + block.length - progress.bytesDone);
        reporter.report(progress);
      }
      await writer.flush();
      result.bytesRead = targetIds.bytesRead;
      await file.sync();
    } finally {
      await file.close();
    }
    reporter.report(progress, true);
  } finally {
    reporter.done(); // also before an error, which would otherwise continue the progress line
    await Promise.all([reader.close(), pool.close()]);
  }
  return result;
}

async function targetSizeBytes(path: string): Promise<number> {
  const st = await stat(path).catch((err: NodeJS.ErrnoException) => {
    throw new TidemarkError('E_DISK', `failback target ${path} cannot be used: ${err.code === 'ENOENT' ? 'it does not exist (failback updates an existing disk; without --failback a new image is written)' : err.message}`, { cause: err });
  });
  if (st.isBlockDevice()) return blockDeviceSizeBytes(path);
  if (st.isFile()) return st.size;
  throw new TidemarkError('E_DISK', `failback target ${path} is neither a block device nor an image file`);
}

/**
 * The chunk ids of the target's blocks (null for an all-zero block), read
 * sequentially in large batches and computed on the block pool's worker
 * threads: the keyed hash of every block is most of a failback's work.
 */
class TargetBlockIds {
  /** Shared memory for one batch, reused: a block's data is not needed once its id is known. */
  private readonly memory = BlockPool.sharedBuffer(READ_BATCH_BYTES + DIRECT_IO_ALIGN);
  private ids: Array<Buffer | null> = [];
  private batchOffset = 0;
  bytesRead = 0;

  constructor(
    private readonly reader: DiskReader,
    private readonly pool: BlockPool,
    private readonly disk: PointDisk,
    private readonly targetBytes: number,
  ) {}

  /** Blocks must be asked for in increasing order. */
  async idOf(block: MapBlock): Promise<Buffer | null> {
    if (block.offset >= this.batchOffset + this.ids.length * this.disk.blockBytes) {
      const batchBytes = Math.floor(READ_BATCH_BYTES / this.disk.blockBytes) * this.disk.blockBytes; // whole blocks
      const wanted = Math.min(batchBytes, this.disk.sizeBytes - block.offset);
      const aligned = Math.min(Math.ceil(wanted / DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN, this.targetBytes - block.offset);
      const data = (await this.reader.readInto(this.memory, block.offset, aligned)).subarray(0, wanted);
      this.ids = (await this.pool.scan(data, this.disk.blockBytes, null)).ids; // every block is "changed" when nothing is known
      this.batchOffset = block.offset;
      this.bytesRead += wanted;
    }
    return this.ids[(block.offset - this.batchOffset) / this.disk.blockBytes]!;
  }
}
