import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { xxh3, xxh64 } from '@node-rs/xxhash';
import { BlockPool } from '../../agent/block-pool.js';
import { SlabPool } from '../../agent/slab-pool.js';
import { VaultKeys, chunkId, openChunk } from '../../shared/chunk-crypto.js';
import { TidemarkError } from '../../shared/errors.js';
import { WorkerPool } from '../../shared/worker-pool.js';

const keys = VaultKeys.fromMaster(randomBytes(32));
const BLOCK = 4096;

/** 40 blocks and a short tail: random, zero, duplicated and compressible blocks mixed. */
function sampleData(): Buffer {
  const random = randomBytes(BLOCK);
  const blocks: Buffer[] = [];
  for (let i = 0; i < 40; i++) {
    if (i % 5 === 0) blocks.push(Buffer.alloc(BLOCK));
    else if (i % 7 === 0) blocks.push(random);
    else if (i % 3 === 0) blocks.push(Buffer.alloc(BLOCK, `text ${i} `));
    else blocks.push(randomBytes(BLOCK));
  }
  blocks.push(randomBytes(1000));
  return Buffer.concat(blocks);
}

/** Runs an ES module program in a child node process, killed after `guardMs` if it has not ended by itself. */
function runChild(program: string, guardMs: number) {
  const dir = mkdtempSync(join(tmpdir(), 'tidemark-pool-'));
  try {
    writeFileSync(join(dir, 'child.mjs'), program);
    return spawnSync(process.execPath, [join(dir, 'child.mjs')], { encoding: 'utf8', timeout: guardMs });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const blockAt = (data: Buffer, i: number) => data.subarray(i * BLOCK, Math.min((i + 1) * BLOCK, data.length));

describe('block pool', () => {
  it('gives the same hashes, ids and envelopes as the single-threaded functions', async () => {
    const pool = new BlockPool(keys, 3);
    try {
      const data = sampleData();
      const count = Math.ceil(data.length / BLOCK);
      const expected = Array.from({ length: count }, (_, i) => xxh64(blockAt(data, i)));

      const all = await pool.scan(data, BLOCK, null);
      assert.deepEqual([...all.hashes], expected);
      assert.deepEqual(all.changed, Array.from({ length: count }, (_, i) => i));
      all.changed.forEach((b, n) => {
        const block = blockAt(data, b);
        if (block.every((x) => x === 0)) assert.equal(all.ids[n], null, `block ${b} is zero`);
        else assert.deepEqual(all.ids[n], chunkId(keys, block), `id of block ${b}`);
      });

      // Known hashes: only the blocks whose hash differs come back as changed.
      const known = BigUint64Array.from(expected);
      const moved = [1, 2, 17, 40];
      for (const b of moved) known[b] = 12345n;
      const some = await pool.scan(data, BLOCK, known);
      assert.deepEqual(some.changed, moved);
      assert.deepEqual(some.ids, moved.map((b) => chunkId(keys, blockAt(data, b))));

      // Legacy known hashes (XXH3-64, before the upgrade) are compared as such; the hashes returned are XXH64.
      const legacy = BigUint64Array.from({ length: count }, (_, i) => xxh3.xxh64(blockAt(data, i)));
      for (const b of moved) legacy[b] = 12345n;
      const upgraded = await pool.scan(data, BLOCK, legacy, true);
      assert.deepEqual(upgraded.changed, moved, 'a block is changed only where its legacy hash differs');
      assert.deepEqual([...upgraded.hashes], expected);

      const toSeal = all.changed.filter((_, n) => all.ids[n] !== null);
      const ids = all.ids.filter((id): id is Buffer => id !== null);
      const envelopes = await pool.seal(data, BLOCK, toSeal, ids);
      assert.equal(envelopes.length, toSeal.length);
      envelopes.forEach((envelope, n) => assert.deepEqual(openChunk(keys, ids[n]!, envelope, BLOCK), blockAt(data, toSeal[n]!)));

      // Zero blocks are recognised without hashing them; their hash is still XXH64's, for a short last block too.
      const zeroScan = await pool.scan(BlockPool.sharedBuffer(BLOCK + 1000), BLOCK, null);
      assert.deepEqual([...zeroScan.hashes], [xxh64(Buffer.alloc(BLOCK)), xxh64(Buffer.alloc(1000))]);
      const legacyZeros = BigUint64Array.of(xxh3.xxh64(Buffer.alloc(BLOCK)), xxh3.xxh64(Buffer.alloc(1000)));
      assert.deepEqual((await pool.scan(BlockPool.sharedBuffer(BLOCK + 1000), BLOCK, legacyZeros, true)).changed, [], 'zero blocks match their legacy hash');
      assert.deepEqual(zeroScan.ids, [null, null]);
    } finally {
      await pool.close();
    }
  });

  it('seals into memory kept beside the data buffer: a batch sealed in several calls keeps every envelope', async () => {
    const pool = new BlockPool(keys, 2);
    try {
      const slab = BlockPool.sharedBuffer(48 * BLOCK); // a read slab, not quite full
      const data = slab.subarray(0, sampleData().copy(slab));
      const scanned = await pool.scan(data, BLOCK, null);
      const blocks = scanned.changed.filter((_, n) => scanned.ids[n] !== null);
      const ids = scanned.ids.filter((id): id is Buffer => id !== null);
      const half = Math.floor(blocks.length / 2);
      const first = await pool.seal(data, BLOCK, blocks.slice(0, half), ids.slice(0, half));
      const second = await pool.seal(data, BLOCK, blocks.slice(half), ids.slice(half));
      [...first, ...second].forEach((envelope, n) => assert.deepEqual(openChunk(keys, ids[n]!, envelope, BLOCK), blockAt(data, blocks[n]!), `block ${blocks[n]}`));
      assert.equal(second[0]!.buffer, first[0]!.buffer, 'one memory for the buffer');
      assert.notEqual(first[0]!.buffer, slab.buffer);
      const again = await pool.seal(data, BLOCK, blocks.slice(0, 1), ids.slice(0, 1));
      assert.equal(again[0]!.buffer, first[0]!.buffer, 'reused, not allocated per seal');
      assert.equal(again[0]!.byteOffset, first[0]!.byteOffset, 'the same slot for the same block');

      // A view starting on a block boundary uses the slots of its blocks; one that does not, fresh memory.
      const later = await pool.seal(data.subarray(3 * BLOCK), BLOCK, [blocks[half]! - 3], [ids[half]!]);
      assert.equal(later[0]!.byteOffset, second[0]!.byteOffset);
      const shifted = data.subarray(100);
      const fresh = await pool.seal(shifted, BLOCK, [1], [chunkId(keys, blockAt(shifted, 1))]);
      assert.notEqual(fresh[0]!.buffer, first[0]!.buffer);
      assert.deepEqual(openChunk(keys, chunkId(keys, blockAt(shifted, 1)), fresh[0]!, BLOCK), blockAt(shifted, 1));
    } finally {
      await pool.close();
    }
  });

  it('reports a failed task and keeps working; refuses work once closed', async () => {
    const pool = new BlockPool(keys, 2);
    try {
      const data = sampleData();
      await assert.rejects(pool.seal(data, BLOCK, [500], [randomBytes(32)]), (err: unknown) => err instanceof TidemarkError && /outside/.test(err.message));
      await assert.rejects(pool.scan(data, BLOCK, new BigUint64Array(3)), /known hashes/);
      assert.equal((await pool.scan(data, BLOCK, null)).hashes.length, 41);
    } finally {
      await pool.close();
    }
    await assert.rejects(pool.scan(sampleData(), BLOCK, null), (err: unknown) => err instanceof TidemarkError && err.code === 'E_STATE');
  });
});

describe('worker pool', () => {
  const script = new URL('./pool-test-worker.js', import.meta.url);

  it('a task error rejects that task only, with its code', async () => {
    const pool = new WorkerPool(script, 2, null);
    try {
      await assert.rejects(pool.run({ op: 'throw' }), (err: unknown) => err instanceof TidemarkError && err.code === 'E_DISK');
      assert.equal(await pool.run({ op: 'echo', value: 7 }), 7);
    } finally {
      await pool.close();
    }
  });

  it('a dying worker fails every pending task and the pool', async () => {
    const pool = new WorkerPool(script, 2, null);
    try {
      const hung = pool.run({ op: 'hang' });
      const queued = pool.run({ op: 'echo', value: 1 });
      const queued2 = pool.run({ op: 'echo', value: 2 });
      const died = pool.run({ op: 'exit' });
      // Whichever worker took which task, the exit poisons the pool: nothing still pending can succeed.
      const results = await Promise.allSettled([hung, queued, queued2, died]);
      assert.equal(results[0]!.status, 'rejected');
      assert.equal(results[3]!.status, 'rejected');
      await assert.rejects(pool.run({ op: 'echo', value: 3 }), /exited unexpectedly/);
    } finally {
      await pool.close();
    }
  });

  it('close() rejects unfinished tasks and lets the process exit', () => {
    // A child process that leaves a task hanging and closes the pool must end by itself.
    const poolUrl = new URL('../../shared/worker-pool.js', import.meta.url).href;
    const program = `
      const { WorkerPool } = await import(${JSON.stringify(poolUrl)});
      const pool = new WorkerPool(new URL(${JSON.stringify(script.href)}), 2, null);
      const hung = pool.run({ op: 'hang' }).then(() => 'resolved', (e) => e.code);
      await pool.close();
      console.log(await hung);`;
    const child = runChild(program, 60_000);
    assert.equal(child.signal, null, 'the child exited by itself (not killed after the hang guard)');
    assert.equal(child.status, 0, child.stderr);
    assert.equal(child.stdout.trim(), 'E_STATE');
  });

  it('an agent process with an unclosed pool would not exit: the check above can fail', () => {
    const program = `
      const { WorkerPool } = await import(${JSON.stringify(new URL('../../shared/worker-pool.js', import.meta.url).href)});
      new WorkerPool(new URL(${JSON.stringify(script.href)}), 1, null);`;
    const child = runChild(program, 3000);
    assert.equal(child.signal, 'SIGTERM');
  });
});

describe('slab pool', () => {
  it('hands out at most its count and wakes a waiter on release; a second release of the same slab does nothing', async () => {
    const slabs = new SlabPool(2, 1024);
    const a = await slabs.acquire();
    const b = await slabs.acquire();
    assert.ok(a.buffer.buffer instanceof SharedArrayBuffer && a.buffer !== b.buffer);
    let third: Buffer | null = null;
    const waiting = slabs.acquire().then((s) => (third = s.buffer));
    await new Promise((r) => setImmediate(r));
    assert.equal(third, null, 'no third slab while two are out');
    a.release();
    assert.equal(await waiting, a.buffer);
    a.release(); // the waiter holds it now: this must not free it for a fourth taker
    let fourth: Buffer | null = null;
    void slabs.acquire().then((s) => (fourth = s.buffer));
    await new Promise((r) => setImmediate(r));
    assert.equal(fourth, null, 'no slab while all are out, whatever a stale holder calls');
    b.release();
    await new Promise((r) => setImmediate(r));
    assert.equal(fourth, b.buffer);
  });
});

