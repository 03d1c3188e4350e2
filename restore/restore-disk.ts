// Restore one disk of a recovery point to a new image file or over a block
// device, every chunk verified (restore/point-blocks.ts). Image files are
// written sparse (zero blocks stay holes) as `<to>.partial` and published only
// when complete (restore/target-file.ts); block devices get every block, zeros included.
import { rmSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { blockDeviceSizeBytes, openDeviceForWriting } from '../shared/block-device.js';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { Progress, ProgressReporter } from '../shared/progress.js';
import type { PointInfo } from '../shared/protocol.js';
import { findDisk, readPointBlocks } from './point-blocks.js';
import { RunWriter } from './run-writer.js';
import { withSignalCleanup } from './signal-cleanup.js';
import { createPartial, publishPartial, targetError } from './target-file.js';

/** The `disk --json` document (DESIGN §9); failback fills every field, a plain restore compares nothing. */
export interface RestoreDiskResult {
  point: number;
  disk: string;
  to: string;
  sizeBytes: number;
  bytesWritten: number;
  bytesFetched: number;
  blocksCompared: number;
}

export async function restoreDisk(conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, diskName: string, to: string): Promise<RestoreDiskResult> {
  const disk = findDisk(point, diskName);
  const target = await stat(to).catch(() => undefined);
  if (target && !target.isBlockDevice()) throw new TidemarkError('E_CONFLICT', `${to} already exists; remove it or choose another --to (or --failback to update it in place)`);
  const isDevice = target?.isBlockDevice() ?? false;
  if (isDevice && blockDeviceSizeBytes(to) < disk.sizeBytes) throw new TidemarkError('E_DISK', `${to} is smaller than the disk (${disk.sizeBytes} bytes)`);
  const partial = isDevice ? undefined : await createPartial(to);
  const file = partial?.file ?? await openDeviceForWriting(to).catch((err: unknown) => {
    throw targetError(err, to, { device: true });
  });
  const removePartial = () => partial && rmSync(partial.path, { force: true });
  const progress = new Progress(`restore ${diskName}`, disk.sizeBytes);
  const reporter = new ProgressReporter(false); // a TTY on stderr only: with --json, stdout carries one document
  const result: RestoreDiskResult = { point: point.id, disk: diskName, to, sizeBytes: disk.sizeBytes, bytesWritten: 0, bytesFetched: 0, blocksCompared: 0 };
  try {
    // An interrupted restore leaves no partial file: it would block the next run (createPartial).
    await withSignalCleanup(removePartial, async () => {
      try {
        if (!isDevice) await file.truncate(disk.sizeBytes);
        const zeros = Buffer.alloc(disk.blockBytes);
        const writer = new RunWriter(file);
        // A device gets every block in order (zeros over whatever was there); an image only its data blocks.
        for await (const block of readPointBlocks(conn, keys, point, disk, result, { everyBlock: isDevice })) {
          const data = block.data ?? zeros.subarray(0, block.length);
          await writer.write(data, block.offset);
          result.bytesWritten += data.length;
          progress.add(block.offset + block.length - progress.bytesDone); // progress is the position on the disk
          reporter.report(progress);
        }
        await writer.flush();
        await file.sync();
      } finally {
        await file.close();
      }
      if (partial) await publishPartial(partial.path, to);
    });
    progress.add(disk.sizeBytes - progress.bytesDone);
    reporter.report(progress, true);
  } catch (err) {
    removePartial();
    throw targetError(err, partial?.path ?? to, { device: isDevice });
  } finally {
    reporter.done(); // also before an error, which would otherwise continue the progress line
  }
  return result;
}
