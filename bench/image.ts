// The bench's disk: a real ext4 filesystem about 60 % full of binaries, logs,
// gzip archives, a duplicated directory and random files (the test fixture
// builder), plus how many bytes of it are data (non-zero blocks).
import { open } from 'node:fs/promises';
import { writeExt4Image } from '../test/fixtures.js';
import { isZeroBlock } from '../shared/zero-block.js';

export const FILL_FRACTION = 0.6;

export async function buildImage(path: string, sizeBytes: number, seed: number): Promise<void> {
  await writeExt4Image(path, sizeBytes, seed, FILL_FRACTION);
}

/** Bytes in blocks of `blockBytes` that are not all zero: what a sync must actually read, hash and store. */
export async function dataBytes(path: string, blockBytes: number): Promise<number> {
  const handle = await open(path, 'r');
  try {
    const buffer = Buffer.alloc(16 * 1024 * 1024);
    let total = 0;
    for (let position = 0; ; ) {
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, position);
      if (bytesRead === 0) break;
      for (let at = 0; at < bytesRead; at += blockBytes) {
        const block = buffer.subarray(at, Math.min(at + blockBytes, bytesRead));
        if (!isZeroBlock(block)) total += block.length;
      }
      position += bytesRead;
    }
    return total;
  } finally {
    await handle.close();
  }
}
