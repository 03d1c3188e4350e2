import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RunWriter } from '../../restore/run-writer.js';

describe('run writer', () => {
  it('writes runs, holes and oversized blocks where they belong', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tidemark-runwriter-'));
    try {
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
        // then a block bigger than the gathering buffer, then a short block at the end.
        for (let offset = 0; offset < 5 * 1024 * 1024; offset += 65536) await put(offset, 65536);
        await put(6 * 1024 * 1024, 65536);
        await put(7 * 1024 * 1024, 5 * 1024 * 1024 - 1000);
        await put(size - 1000, 1000);
        await writer.flush();
      } finally {
        await file.close();
      }
      assert.ok(readFileSync(path).equals(expected));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reports a write that failed behind the caller at the next write or flush', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tidemark-runwriter-'));
    try {
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
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
