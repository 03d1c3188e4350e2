// Reads a protected disk: in large sequential pieces (scans), or many scattered
// runs at once (continuous mode's rounds).
//
// Block devices are read with O_DIRECT: a mounted filesystem writes through
// bios that bypass the block device's page cache, so a buffered read of
// /dev/X can return stale data (seen on ext4 over a loop device). O_DIRECT
// needs a buffer aligned to the logical block size; Node does not expose
// buffer addresses, so the reader finds an aligned offset inside a slightly
// larger buffer by probing once.
import { constants, open, stat, type FileHandle } from 'node:fs/promises';
import { TidemarkError } from './errors.js';

const ALIGN_PROBE_STEP = 16;
const ALIGN_MAX = 4096;

export class DiskReader {
  private constructor(
    private readonly handle: FileHandle,
    /** Aligned scratch buffer for O_DIRECT reads; null for buffered reads. */
    private readonly aligned: Buffer | null,
  ) {}

  static async open(path: string, maxReadBytes: number): Promise<DiskReader> {
    if (!(await stat(path)).isBlockDevice()) return new DiskReader(await open(path, 'r'), null);
    const handle = await open(path, constants.O_RDONLY | constants.O_DIRECT);
    try {
      return new DiskReader(handle, await findAlignedBuffer(handle, maxReadBytes));
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Returns a buffer of its own (callers may keep it while the next read runs). */
  async read(position: number, length: number): Promise<Buffer> {
    return this.readInto(Buffer.allocUnsafe(length), position, length);
  }

  /**
   * Reads into the caller's buffer (e.g. shared memory for worker threads) and
   * returns the filled part. With O_DIRECT the data goes through the aligned
   * scratch buffer, one copy; otherwise straight into `target`.
   */
  async readInto(target: Buffer, position: number, length: number): Promise<Buffer> {
    if (length > target.length) throw new RangeError(`read of ${length} bytes into a ${target.length}-byte buffer`);
    const landing = this.aligned ? this.aligned.subarray(0, length) : target.subarray(0, length);
    await this.fill(landing, position);
    if (this.aligned) landing.copy(target, 0, 0, length);
    return target.subarray(0, length);
  }

  /**
   * Reads several ranges at once (each into a buffer of its own), as many at a
   * time as fit the scratch buffer; `onRead` learns when each read began and
   * ended. Concurrent reads keep a round of scattered blocks short.
   */
  async readMany(ranges: ReadonlyArray<{ position: number; length: number }>, onRead: (index: number, data: Buffer, startedAt: number, endedAt: number) => void, now: () => number): Promise<void> {
    const capacity = this.aligned?.length ?? Infinity;
    const tooLong = ranges.find((r) => r.length > capacity);
    if (tooLong) throw new RangeError(`read of ${tooLong.length} bytes with a ${capacity}-byte scratch buffer`);
    for (let next = 0; next < ranges.length;) {
      const batch: Array<Promise<void>> = [];
      for (let used = 0; next < ranges.length && used + ranges[next]!.length <= capacity; next++) {
        const { position, length } = ranges[next]!;
        const index = next;
        const landing = this.aligned?.subarray(used, used + length) ?? Buffer.allocUnsafe(length);
        used += length;
        batch.push((async () => {
          const startedAt = now();
          await this.fill(landing, position);
          onRead(index, this.aligned ? Buffer.from(landing) : landing, startedAt, now());
        })());
      }
      await Promise.all(batch);
    }
  }

  private async fill(landing: Buffer, position: number): Promise<void> {
    for (let done = 0; done < landing.length;) {
      const { bytesRead } = await this.handle.read(landing, done, landing.length - done, position + done);
      if (bytesRead === 0) throw new TidemarkError('E_DISK', `disk shrank while reading: short read at byte ${position + done}`);
      done += bytesRead;
    }
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}

async function findAlignedBuffer(handle: FileHandle, bytes: number): Promise<Buffer> {
  const raw = Buffer.allocUnsafeSlow(bytes + ALIGN_MAX);
  for (let offset = 0; offset < ALIGN_MAX; offset += ALIGN_PROBE_STEP) {
    try {
      await handle.read(raw, offset, ALIGN_MAX, 0);
      return raw.subarray(offset, offset + bytes);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
    }
  }
  throw new TidemarkError('E_DISK', 'cannot read the device with O_DIRECT (no aligned buffer found)');
}
