// verify, end to end through real processes: `tidemark-receiver verify` (no
// key) and `tidemark-restore verify --read-data` (with the key) find damage in
// the pack files, name it and the points it breaks; a restore of a broken
// point fails closed while the other points still restore byte-identical.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, renameSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { envelopeChecksum, ENTRY_HEADER_BYTES } from '../receiver/pack-store.js';
import { Deployment, runCli, type CliResult } from './harness.js';
import { changeBlocks, sha256File, writeMixedImage } from './fixtures.js';
import { flipByte, readAt, writeAt } from './file-bytes.js';

const MiB = 1024 * 1024;

interface Located {
  id: string;
  file: string;
  path: string;
  offset: number;
  length: number;
}

function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  assert.equal(lines.length, 1, `expected a one-line error, got:\n${stderr}`);
  return lines[0]!;
}

describe('verify', () => {
  let d: Deployment;
  let disk: string;
  let atPoint1: string;
  let p1: number;
  let p2: number;

  const receiverVerify = (json = true): Promise<CliResult> => runCli('receiver', ['verify', '--data', d.receiver.dataDir, ...(json ? ['--json'] : [])]);
  const restoreVerify = (extra: string[] = ['--read-data', '--json']): Promise<CliResult> =>
    runCli('restore', ['verify', ...d.restoreArgs('alpha'), ...extra], { TIDEMARK_TOKEN: d.restoreToken });
  const restorePoint = (pointId: number, to: string): Promise<CliResult> =>
    runCli('restore', ['disk', ...d.restoreArgs('alpha'), '--disk', disk, '--point', String(pointId), '--to', to], { TIDEMARK_TOKEN: d.restoreToken });

  /** Chunks (with their pack entry) chosen by SQL over the catalog, read-only beside the running receiver. */
  function locate(where: string, ...params: unknown[]): Located[] {
    const db = new Database(join(d.receiver.dataDir, 'catalog.db'), { readonly: true });
    try {
      const rows = db.prepare(`
        SELECT c.id, p.file, c.offset, c.length FROM chunk c JOIN pack p ON p.id = c.pack_id
        WHERE ${where} ORDER BY p.id, c.offset`).all(...params) as Array<{ id: Buffer; file: string; offset: number; length: number }>;
      return rows.map((r) => ({ id: r.id.toString('hex'), file: r.file, path: join(d.receiver.dataDir, 'packs', r.file), offset: r.offset, length: r.length }));
    } finally {
      db.close();
    }
  }
  /** A chunk that block versions of point `only` reference, and no other point's. */
  const onlyIn = (only: number) => locate(`
    c.id IN (SELECT chunk_id FROM block_version WHERE point_id = ?)
    AND c.id NOT IN (SELECT chunk_id FROM block_version WHERE point_id <> ? AND chunk_id IS NOT NULL)`, only, only);

  before(async () => {
    d = await Deployment.start();
    await d.enroll('alpha');
    disk = join(d.root, 'alpha.img');
    await writeMixedImage(disk, 16 * MiB, 11);
    p1 = (await d.syncOnce('alpha', [disk])).pointId;
    atPoint1 = join(d.root, 'alpha-at-point-1.img');
    copyFileSync(disk, atPoint1);
    await changeBlocks(disk, 64 * 1024, 6, 23);
    p2 = (await d.syncOnce('alpha', [disk])).pointId;
    assert.ok(p2 > p1);
  });
  after(() => d?.close());

  it('is clean on an undamaged store, with and without the key', async () => {
    const status = await d.receiver.status();
    const result = await receiverVerify();
    assert.equal(result.code, 0, result.stderr);
    const report = JSON.parse(result.stdout);
    assert.equal(report.ok, true);
    assert.deepEqual(report.damaged, []);
    assert.equal(report.chunksChecked, status.storedChunks);
    assert.equal(report.bytesChecked, status.storedChunkBytes + status.storedChunks * ENTRY_HEADER_BYTES);
    assert.ok(report.packsChecked >= 1);

    const human = await receiverVerify(false);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /no damage found/);

    const keyed = await restoreVerify();
    assert.equal(keyed.code, 0, keyed.stderr);
    const keyedReport = JSON.parse(keyed.stdout);
    assert.equal(keyedReport.ok, true);
    assert.equal(keyedReport.pointsChecked, 2);
    assert.equal(keyedReport.chunksChecked, status.storedChunks, 'every stored chunk is read by some point, and fetched once');
  });

  it('without --read-data is a usage error that points at the key-less check', async () => {
    const result = await restoreVerify(['--json']);
    assert.equal(result.code, 2);
    assert.match(oneLine(result.stderr), /--read-data.*tidemark-receiver verify/);
  });

  it('finds a flipped byte in a chunk of point 2, names it and point 2 only; restore of point 2 fails closed, point 1 still restores', async () => {
    const [target] = onlyIn(p2);
    assert.ok(target, 'point 2 has a chunk of its own');
    const undo = flipByte(target.path, target.offset + ENTRY_HEADER_BYTES + 40);
    try {
      const result = await receiverVerify();
      assert.equal(result.code, 5, result.stderr);
      assert.match(oneLine(result.stderr), /verify found 1 damaged object .*1 recovery point/);
      const report = JSON.parse(result.stdout);
      assert.equal(report.ok, false);
      assert.equal(report.damaged.length, 1);
      const [damage] = report.damaged;
      assert.equal(damage.kind, 'chunk');
      assert.equal(damage.pack, target.file);
      assert.equal(damage.offset, target.offset);
      assert.equal(damage.chunkId, target.id);
      assert.match(damage.message, /checksum mismatch/);
      assert.deepEqual(damage.affectedPoints, [{ host: 'alpha', pointId: p2, disk }]);

      const human = await receiverVerify(false);
      assert.equal(human.code, 5);
      assert.ok(human.stdout.includes(`breaks restore of host alpha disk ${disk}: point ${p2}\n`), human.stdout);

      const keyed = await restoreVerify();
      assert.equal(keyed.code, 5, keyed.stderr);
      oneLine(keyed.stderr);
      const keyedReport = JSON.parse(keyed.stdout);
      assert.equal(keyedReport.ok, false);
      assert.deepEqual(keyedReport.damaged.map((x: any) => [x.chunkId, x.affectedPoints]), [[target.id, [{ host: 'alpha', pointId: p2, disk }]]]);

      const out2 = join(d.root, 'point2.img');
      const restore2 = await restorePoint(p2, out2);
      assert.equal(restore2.code, 5, restore2.stderr);
      assert.ok(oneLine(restore2.stderr).includes(target.id), restore2.stderr);
      assert.equal(existsSync(out2), false, 'no image is left behind');
      assert.equal(existsSync(`${out2}.partial`), false, 'no partial image is left behind');

      const out1 = join(d.root, 'point1.img');
      const restore1 = await restorePoint(p1, out1);
      assert.equal(restore1.code, 0, restore1.stderr);
      assert.equal(await sha256File(out1), await sha256File(atPoint1));
    } finally {
      undo();
    }
    assert.equal((await receiverVerify()).code, 0, 'clean again once the byte is back');
  });

  it('finds a flipped byte in an entry header and names every point that reads the chunk', async () => {
    // A chunk of point 1 that point 2 did not replace: both points read it.
    const [target] = locate(`
      c.id IN (SELECT chunk_id FROM block_version WHERE point_id = ?)
      AND c.id NOT IN (SELECT chunk_id FROM block_version WHERE point_id <> ? AND chunk_id IS NOT NULL)
      AND NOT EXISTS (SELECT 1 FROM block_version a JOIN block_version b ON b.disk_id = a.disk_id AND b.block_index = a.block_index
                      WHERE a.chunk_id = c.id AND b.point_id = ?)`, p1, p1, p2);
    assert.ok(target);
    const undo = flipByte(target.path, target.offset + 12); // inside the chunk id field
    try {
      const result = await receiverVerify();
      assert.equal(result.code, 5, result.stderr);
      const report = JSON.parse(result.stdout);
      assert.equal(report.damaged.length, 1);
      const [damage] = report.damaged;
      assert.deepEqual([damage.kind, damage.pack, damage.offset, damage.chunkId], ['chunk', target.file, target.offset, target.id]);
      assert.match(damage.message, /entry names chunk/);
      assert.deepEqual(damage.affectedPoints, [{ host: 'alpha', pointId: p1, disk }, { host: 'alpha', pointId: p2, disk }]);
    } finally {
      undo();
    }
  });

  it('finds a truncated pack file and the chunks cut off', async () => {
    const all = locate('1');
    const last = all.at(-1)!;
    const backup = join(d.root, 'pack.backup');
    copyFileSync(last.path, backup);
    const cut = last.offset + 100;
    truncateSync(last.path, cut);
    try {
      const result = await receiverVerify();
      assert.equal(result.code, 5, result.stderr);
      const report = JSON.parse(result.stdout);
      const pack = report.damaged.find((x: any) => x.kind === 'pack');
      assert.ok(pack, result.stdout);
      assert.equal(pack.pack, last.file);
      assert.equal(pack.offset, cut);
      assert.match(pack.message, /shorter than/);
      const chunk = report.damaged.find((x: any) => x.kind === 'chunk');
      assert.deepEqual([chunk.pack, chunk.offset, chunk.chunkId], [last.file, last.offset, last.id]);
      assert.match(chunk.message, /extends past the end/);
      assert.equal(report.damaged.length, 2);
      assert.ok(chunk.affectedPoints.length > 0);
      assert.deepEqual(pack.affectedPoints, chunk.affectedPoints);
    } finally {
      copyFileSync(backup, last.path);
    }
  });

  it('a pack file missing: restore of a point that reads it is an integrity failure that names it, not a local disk error', async () => {
    const [chunk] = onlyIn(p2);
    const aside = join(d.root, 'pack.aside');
    renameSync(chunk!.path, aside);
    try {
      const result = await restorePoint(p2, join(d.root, 'missing-pack.img'));
      assert.equal(result.code, 5, result.stderr);
      assert.match(result.stderr, new RegExp(`is in a pack file missing from the receiver's data directory \\(.*${chunk!.file}.*\\); run tidemark-receiver verify`));
    } finally {
      renameSync(aside, chunk!.path);
    }
  });

  it('finds a damaged pack header', async () => {
    const [first] = locate('1');
    const undo = flipByte(first!.path, 1);
    try {
      const result = await receiverVerify();
      assert.equal(result.code, 5, result.stderr);
      const report = JSON.parse(result.stdout);
      assert.deepEqual(report.damaged.map((x: any) => [x.kind, x.pack, x.offset]), [['pack', first!.file, 0]]);
      assert.match(report.damaged[0].message, /header is not TMPK version 2 or 1/);
    } finally {
      undo();
    }
  });

  it('only the key finds an envelope whose checksum was rewritten to match', async () => {
    const [target] = onlyIn(p2);
    const entry = readAt(target!.path, target!.offset, ENTRY_HEADER_BYTES + target!.length);
    const forged = Buffer.from(entry);
    forged[ENTRY_HEADER_BYTES + 60] ^= 0x01;
    envelopeChecksum(forged.subarray(ENTRY_HEADER_BYTES)).copy(forged, 40);
    writeAt(target!.path, target!.offset, forged);
    try {
      assert.equal((await receiverVerify()).code, 0, 'the receiver cannot tell without the key');
      const keyed = await restoreVerify();
      assert.equal(keyed.code, 5, keyed.stderr);
      const report = JSON.parse(keyed.stdout);
      assert.equal(report.damaged.length, 1);
      assert.equal(report.damaged[0].chunkId, target!.id);
      assert.match(report.damaged[0].message, /failed authentication/);
      assert.deepEqual(report.damaged[0].affectedPoints, [{ host: 'alpha', pointId: p2, disk }]);
      const restore2 = await restorePoint(p2, join(d.root, 'forged.img'));
      assert.equal(restore2.code, 5);
      assert.ok(oneLine(restore2.stderr).includes(target!.id));
    } finally {
      writeAt(target!.path, target!.offset, entry);
    }
  });

  it('runs without a receiver serving, on the read-only catalog', async () => {
    await d.receiver.stop();
    const before = statSync(join(d.receiver.dataDir, 'catalog.db')).mtimeMs;
    const result = await receiverVerify();
    assert.equal(result.code, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout).ok, true);
    assert.equal(statSync(join(d.receiver.dataDir, 'catalog.db')).mtimeMs, before, 'verify did not write the catalog');
  });
});
