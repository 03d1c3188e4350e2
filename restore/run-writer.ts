// Gathers blocks that follow each other on the disk into one write of up to
// RUN_BYTES: a write per 64 KiB block costs a thread-pool round trip each,
// which dominated restore time. Blocks that do not continue the current run
// (a hole in a sparse image) flush it first.
import type { FileHandle } from 'node:fs/promises';

const RUN_BYTES = 4 * 1024 * 1024;

export class RunWriter {
  private readonly buffer = Buffer.allocUnsafe(RUN_BYTES);
  private runOffset = 0;
  private runBytes = 0;

  constructor(private readonly file: FileHandle) {}

  async write(data: Buffer, offset: number): Promise<void> {
    const continues = this.runBytes > 0 && offset === this.runOffset + this.runBytes;
    if (this.runBytes > 0 && (!continues || this.runBytes + data.length > RUN_BYTES)) await this.flush();
    if (data.length > RUN_BYTES) {
      await this.writeAll(data, offset);
      return;
    }
    if (this.runBytes === 0) this.runOffset = offset;
    data.copy(this.buffer, this.runBytes);
    this.runBytes += data.length;
  }

  /** Writes what is gathered; call before syncing or closing the file. */
  async flush(): Promise<void> {
    if (this.runBytes === 0) return;
    const bytes = this.runBytes;
    this.runBytes = 0;
    await this.writeAll(this.buffer.subarray(0, bytes), this.runOffset);
  }

  private async writeAll(data: Buffer, offset: number): Promise<void> {
    for (let done = 0; done < data.length; ) {
      const { bytesWritten } = await this.file.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }
}
