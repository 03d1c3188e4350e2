// Restore one disk of a recovery point: page through the point's block map,
// fetch each chunk once, check it (GCM tag and keyed id), write it in place.
// Image files are written sparse (zero blocks stay holes) under a temporary
// name and renamed only when complete; block devices get every block.
import { open, rename, rm, stat } from 'node:fs/promises';
import { blockDeviceSizeBytes } from '../shared/block-device.js';
import { openChunk, type VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { Progress, ProgressReporter } from '../shared/progress.js';
import { MAX_MAP_PAGE, type PointInfo } from '../shared/protocol.js';

const FETCH_CONCURRENCY = 16;

export interface RestoreDiskResult {
  point: number;
  disk: string;
  to: string;
  sizeBytes: number;
  bytesWritten: number;
  bytesFetched: number;
  blocksCompared: number;
}

export async function restoreDisk(
  conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, diskName: string, to: string, progressAsJson: boolean,
): Promise<RestoreDiskResult> {
  const disk = point.disks.find((d) => d.name === diskName);
  if (!disk) {
    throw new TidemarkError('E_NOT_FOUND', `point ${point.id} has no disk "${diskName}"; it has: ${point.disks.map((d) => d.name).join(', ') || 'none'}`);
  }
  const target = await stat(to).catch(() => undefined);
  if (target && !target.isBlockDevice()) throw new TidemarkError('E_CONFLICT', `${to} already exists; remove it or choose another --to`);
  const isDevice = target?.isBlockDevice() ?? false;
  const writePath = isDevice ? to : `${to}.partial`;
  const file = await open(writePath, isDevice ? 'r+' : 'w', 0o600);
  const progress = new Progress(`restore ${diskName}`, disk.sizeBytes);
  const reporter = new ProgressReporter(progressAsJson);
  const result: RestoreDiskResult = { point: point.id, disk: diskName, to, sizeBytes: disk.sizeBytes, bytesWritten: 0, bytesFetched: 0, blocksCompared: 0 };
  try {
    if (isDevice) {
      if (blockDeviceSizeBytes(to) < disk.sizeBytes) throw new TidemarkError('E_DISK', `${to} is smaller than the disk (${disk.sizeBytes} bytes)`);
    } else {
      await file.truncate(disk.sizeBytes);
    }
    let nextZeroFrom = 0; // block devices: blocks below this are written (data or zeros)
    const zeros = Buffer.alloc(disk.blockBytes);
    const writeZerosUpTo = async (block: number) => {
      for (; nextZeroFrom < block; nextZeroFrom++) {
        const offset = nextZeroFrom * disk.blockBytes;
        const length = Math.min(disk.blockBytes, disk.sizeBytes - offset);
        await file.write(zeros, 0, length, offset);
        result.bytesWritten += length;
      }
    };
    let from: number | null = 0;
    while (from !== null) {
      const page: Awaited<ReturnType<typeof conn.request<'point.map'>>> = await conn.request('point.map', { pointId: point.id, diskId: disk.diskId, fromBlock: from, limit: MAX_MAP_PAGE });
      // Fetch each distinct chunk of the page once; write it to every block that holds it.
      // Blocks past the end belong to a time the disk was larger: not part of this point.
      const blockCount = Math.ceil(disk.sizeBytes / disk.blockBytes);
      const blocksById = new Map<string, number[]>();
      page.ids.forEach((id, i) => {
        if (page.blocks[i]! >= blockCount) return;
        const key = id.toString('hex');
        const blocks = blocksById.get(key);
        if (blocks) blocks.push(page.blocks[i]!);
        else blocksById.set(key, [page.blocks[i]!]);
      });
      const entries = [...blocksById.entries()];
      const fetchOne = async ([hex, blocks]: [string, number[]]) => {
        const id = Buffer.from(hex, 'hex');
        const { data } = await conn.request('chunk.get', { id });
        result.bytesFetched += data.length;
        const plaintext = openChunk(keys, id, data, disk.blockBytes);
        for (const block of blocks) {
          const offset = block * disk.blockBytes;
          if (plaintext.length !== Math.min(disk.blockBytes, disk.sizeBytes - offset)) {
            throw new TidemarkError('E_INTEGRITY', `chunk ${hex} has ${plaintext.length} bytes, not the size of block ${block}`);
          }
          await file.write(plaintext, 0, plaintext.length, offset);
          result.bytesWritten += plaintext.length;
          progress.add(plaintext.length);
        }
      };
      if (isDevice) {
        // Keep device writes in block order so zero-filling can follow behind.
        for (const [i, block] of page.blocks.entries()) {
          if (block >= blockCount) break;
          await writeZerosUpTo(block);
          await fetchOne([page.ids[i]!.toString('hex'), [block]]);
          nextZeroFrom = block + 1;
        }
      } else {
        await runWithConcurrency(entries, FETCH_CONCURRENCY, fetchOne);
      }
      reporter.report(progress);
      from = page.next;
    }
    if (isDevice) await writeZerosUpTo(Math.ceil(disk.sizeBytes / disk.blockBytes));
    await file.sync();
  } catch (err) {
    await file.close();
    if (!isDevice) await rm(writePath, { force: true });
    throw err;
  }
  await file.close();
  if (!isDevice) await rename(writePath, to);
  progress.add(disk.sizeBytes - progress.bytesDone);
  reporter.report(progress, true);
  reporter.done();
  return result;
}

async function runWithConcurrency<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}
