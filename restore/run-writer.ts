// Gathers blocks that follow each other on the disk into one write of up to
// RUN_BYTES: a write per 64 KiB block costs a thread-pool round trip each,
// which dominated restore time. Blocks that do not continue the current run
// (a hole in a sparse image) flush it first.
//
// A run is a list of the caller's buffers, written with one writev (no copy
// into a buffer of our own: that was ~0.12 s per GiB of the restore's main
// thread). One run is written while the next is gathered, so the caller
// (fetching and opening chunks) does not stop for each write. A failed write
// surfaces at the next write or flush.
//
// Every SYNC_EVERY_BYTES written, a datasync starts in the background (one at a
// time): the disk writes while the restore works, so the caller's final fsync
// waits for the last stretch only (~0.33 s per GiB here when it waited for all),
// and dirty memory stays bounded however large the disk. A failed sync
// surfaces like a failed write.
import type { FileHandle } from 'node:fs/promises';
import { TidemarkError } from '../shared/errors.js';

const RUN_BYTES = 4 * 1024 * 1024;
const SYNC_EVERY_BYTES = 64 * 1024 * 1024;

export class RunWriter {
  /** The run being gathered: the caller's buffers, one after the other on the disk. */
  private run: Buffer[] = [];
  private runOffset = 0;
  private runBytes = 0;
  /** The write of the previous run, still going. */
  private writing: Promise<void> = Promise.resolve();
  /** Bytes written since the last background sync started. */
  private unsynced = 0;
  /** The background sync, if one is running; it never rejects (see syncFailure). */
  private syncing: Promise<void> | null = null;
  private syncFailure: Error | null = null;

  constructor(private readonly file: FileHandle, private readonly syncEveryBytes = SYNC_EVERY_BYTES) {}

  /** Writes `data` at `offset`, later; `data` is written as it is then, so it must not change until flush. */
  async write(data: Buffer, offset: number): Promise<void> {
    const continues = this.runBytes > 0 && offset === this.runOffset + this.runBytes;
    if (this.runBytes > 0 && (!continues || this.runBytes + data.length > RUN_BYTES)) await this.startRunWrite();
    if (this.runBytes === 0) this.runOffset = offset;
    this.run.push(data);
    this.runBytes += data.length;
  }

  /** Writes what is gathered and waits for every write and background sync; call before syncing or closing the file. */
  async flush(): Promise<void> {
    await this.startRunWrite();
    await this.writing;
    await this.syncing;
    this.throwSyncFailure();
  }

  /** Waits for the previous run's write, then starts this run's. */
  private async startRunWrite(): Promise<void> {
    await this.writing;
    this.throwSyncFailure();
    if (this.runBytes === 0) return;
    this.writing = this.writeAll(this.run, this.runOffset);
    this.writing.catch(() => {}); // awaited at the next write or flush, where its error surfaces
    this.run = [];
    this.runBytes = 0;
  }

  private async writeAll(run: Buffer[], offset: number): Promise<void> {
    let position = offset;
    for (let rest = run; rest.length > 0; ) {
      const { bytesWritten } = await this.file.writev(rest, position);
      if (bytesWritten === 0) throw new TidemarkError('E_DISK', `write at byte ${position} made no progress; check the target device`);
      position += bytesWritten;
      rest = after(rest, bytesWritten);
    }
    this.unsynced += position - offset;
    if (this.unsynced >= this.syncEveryBytes && !this.syncing) this.startSync();
  }

  private startSync(): void {
    this.unsynced = 0;
    this.syncing = this.file.datasync().then(
      () => void (this.syncing = null),
      (err: Error) => {
        this.syncFailure ??= err;
        this.syncing = null;
      },
    );
  }

  private throwSyncFailure(): void {
    if (this.syncFailure) throw this.syncFailure;
  }
}

/** What is left of `buffers` once their first `bytes` were written (a short writev). */
function after(buffers: Buffer[], bytes: number): Buffer[] {
  let skip = bytes;
  let first = 0;
  while (first < buffers.length && skip >= buffers[first]!.length) skip -= buffers[first++]!.length;
  const rest = buffers.slice(first);
  if (skip > 0) rest[0] = rest[0]!.subarray(skip);
  return rest;
}
