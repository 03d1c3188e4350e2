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

  /** `noFollow`: a symbolic link at `path` is refused (ELOOP), not followed; for files of the agent's own making. */
  static async open(path: string, maxReadBytes: number, { noFollow = false } = {}): Promise<DiskReader> {
    if (noFollow) return new DiskReader(await open(path, constants.O_RDONLY | constants.O_NOFOLLOW), null);
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
   * Reads several ranges at once, each into a buffer of its own; together they
   * must fit the scratch buffer. `onRead` learns when each read began and ended.
   * Concurrent reads keep a round of scattered blocks short.
   */
  async readMany(ranges: ReadonlyArray<{ position: number; length: number }>, onRead: (index: number, data: Buffer, startedAt: number, endedAt: number) => void, now: () => number): Promise<void> {
    const total = ranges.reduce((sum, r) => sum + r.length, 0);
    if (this.aligned && total > this.aligned.length) throw new RangeError(`reads of ${total} bytes at once with a ${this.aligned.length}-byte scratch buffer`);
    let used = 0;
    await Promise.all(ranges.map(async ({ position, length }, index) => {
      const landing = this.aligned?.subarray(used, used + length) ?? Buffer.allocUnsafe(length);
      used += length;
      const startedAt = now();
      await this.fill(landing, position);
      onRead(index, this.aligned ? Buffer.from(landing) : landing, startedAt, now());
    }));
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
