import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RunWriter } from '../../restore/run-writer.js';

/** Runs `test` with a fresh directory, removed afterwards whatever happens. */
async function inTempDir(test: (dir: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'tidemark-runwriter-'));
  try {
    await test(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('run writer', () => {
  it('writes runs, holes and oversized blocks where they belong', async () => {
    await inTempDir(async (dir) => {
      const path = join(dir, 'out.img');
      const size = 12 * 1024 * 1024;
      const expected = Buffer.alloc(size);
      const file = await open(path, 'w');
      try {
        await file.truncate(size);
        const writer = new RunWriter(file);
        const put = async (offset: number, length: number) => {
          const data = randomBytes(length);
          data.copy(expected, offset);
          await writer.write(data, offset);
        };
        // A contiguous run longer than one gathered write, then a hole, then a lone block,
        // then a block bigger than a whole run, then a short block at the end.
        for (let offset = 0; offset < 5 * 1024 * 1024; offset += 65536) await put(offset, 65536);
        await put(6 * 1024 * 1024, 65536);
        await put(7 * 1024 * 1024, 5 * 1024 * 1024 - 1000);
        await put(size - 1000, 1000);
        await writer.flush();
      } finally {
        await file.close();
      }
      assert.ok(readFileSync(path).equals(expected));
    });
  });

  // A wrong remainder after a short write never finishes: the timeout turns that into a failure.
  it('finishes a run that the kernel wrote only part of', { timeout: 30_000 }, async () => {
    await inTempDir(async (dir) => {
      const path = join(dir, 'out.img');
      const expected = randomBytes(3 * 65536 + 1000);
      const file = await open(path, 'w');
      try {
        // The real file, but each writev writes at most 10,000 bytes, as a short write would.
        const short = {
          writev: (buffers: Buffer[], position: number) => file.write(Buffer.concat(buffers).subarray(0, 10_000), 0, undefined, position),
          datasync: file.datasync.bind(file),
        } as unknown as FileHandle;
        const writer = new RunWriter(short);
        for (let offset = 0; offset < expected.length; offset += 65536) await writer.write(expected.subarray(offset, offset + 65536), offset);
        await writer.flush();
      } finally {
        await file.close();
      }
      assert.ok(readFileSync(path).equals(expected));
    });
  });

  it('fails with E_DISK, not a loop, when a write makes no progress', { timeout: 30_000 }, async () => {
    await inTempDir(async (dir) => {
      const file = await open(join(dir, 'out.img'), 'w');
      try {
        // A device that accepts nothing cannot be made here: a writev that reports 0 bytes written stands in.
        // (It answers on a later turn of the event loop, as a real write does, so the test's timeout can fire.)
        const stuck = {
          writev: () => new Promise((resolve) => setImmediate(() => resolve({ bytesWritten: 0 }))),
          datasync: file.datasync.bind(file),
        } as unknown as FileHandle;
        const writer = new RunWriter(stuck);
        await writer.write(randomBytes(65536), 0);
        await assert.rejects(writer.flush(), { code: 'E_DISK', message: /write at byte 0 made no progress/ });
      } finally {
        await file.close();
      }
    });
  });

  it('reports a write that failed behind the caller at the next write or flush', async () => {
    await inTempDir(async (dir) => {
      const path = join(dir, 'out.img');
      writeFileSync(path, Buffer.alloc(1024 * 1024));
      const file = await open(path, 'r'); // every write fails with EBADF
      try {
        const writer = new RunWriter(file);
        await writer.write(randomBytes(65536), 0);
        await writer.write(randomBytes(65536), 512 * 1024); // a hole: the first run's write starts, not awaited
        // The next run to start waits for that write first, so the next write reports it...
        await assert.rejects(writer.write(randomBytes(65536), 768 * 1024), { code: 'EBADF' });
        // ...and so does a flush of whatever was gathered since.
        await assert.rejects(writer.flush(), { code: 'EBADF' });
      } finally {
        await file.close();
      }
    });
  });

  it('syncs in the background as it writes, so the data reaches the disk before the caller\'s final fsync', async () => {
    await inTempDir(async (dir) => {
      const path = join(dir, 'out.img');
      const size = 40 * 1024 * 1024;
      const expected = randomBytes(size);
      const file = await open(path, 'w');
      try {
        // The real file, with its datasync calls recorded as they start and end.
        const events: string[] = [];
        const watched = {
          writev: file.writev.bind(file),
          datasync: async () => {
            events.push('sync');
            await file.datasync();
            events.push('synced');
          },
        } as unknown as FileHandle;
        const writer = new RunWriter(watched, 8 * 1024 * 1024);
        for (let offset = 0; offset < size; offset += 65536) await writer.write(expected.subarray(offset, offset + 65536), offset);
        const syncsBeforeFlush = events.filter((e) => e === 'sync').length;
        await writer.flush();
        assert.ok(syncsBeforeFlush >= 1, 'a sync started while the caller was still writing');
        assert.equal(events.at(-1), 'synced', 'flush waits for the sync in flight');
        for (let i = 1; i < events.length; i++) assert.notEqual(events[i], events[i - 1], 'one sync at a time');
      } finally {
        await file.close();
      }
      assert.ok(readFileSync(path).equals(expected));
    });
  });

  it('reports a background sync that failed at the next write or flush', async () => {
    await inTempDir(async (dir) => {
      const file = await open(join(dir, 'out.img'), 'w');
      try {
        // A disk whose flush fails cannot be made here (no device-mapper for dm-flakey):
        // the real file's datasync is replaced by one that fails with EIO.
        const failing = {
          writev: file.writev.bind(file),
          datasync: async () => {
            throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
          },
        } as unknown as FileHandle;
        const writer = new RunWriter(failing, 4 * 1024 * 1024);
        const block = randomBytes(65536);
        // Contiguous blocks: each 4 MiB run is written when the next block does not fit it.
        const writeUntilRejected = async () => {
          for (let offset = 0; offset < 64 * 1024 * 1024; offset += 65536) await writer.write(block, offset);
        };
        await assert.rejects(writeUntilRejected(), { code: 'EIO' });
        await assert.rejects(writer.flush(), { code: 'EIO' });
      } finally {
        await file.close();
      }
    });
  });
});
