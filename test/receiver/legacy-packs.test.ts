// Version 1 packs (entries "TMPE" with XXH3-128 checksums), as receivers wrote
// them before XXH64 entries, in a real data directory: the points in them
// restore byte-identical, verify checks them (and still finds damage in them),
// serve marks the directory version 2, new chunks go to version 2 packs, and
// compaction rewrites a version 1 pack as version 2.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { xxh3, xxh64 } from '@node-rs/xxhash';
import { Deployment, runCli, runJson } from '../harness.js';
import { changeBlocks, sha256File, writeMixedImage } from '../fixtures.js';
import { flipByte, readAt, writeAt } from '../file-bytes.js';

const MiB = 1024 * 1024;
const ENTRY_HEADER = 56;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Entry {
  path: string;
  offset: number;
  length: number;
  id: Buffer;
}

/** Every catalogued entry, read-only beside the receiver. */
function entries(dataDir: string): Entry[] {
  const db = new Database(join(dataDir, 'catalog.db'), { readonly: true });
  try {
    const rows = db.prepare('SELECT p.file, c.offset, c.length, c.id FROM chunk c JOIN pack p ON p.id = c.pack_id ORDER BY p.id, c.offset').all() as Array<{ file: string; offset: number; length: number; id: Buffer }>;
    return rows.map((r) => ({ path: join(dataDir, 'packs', r.file), offset: r.offset, length: r.length, id: r.id }));
  } finally {
    db.close();
  }
}

function packPaths(dataDir: string): string[] {
  const db = new Database(join(dataDir, 'catalog.db'), { readonly: true });
  try {
    return (db.prepare('SELECT file FROM pack').pluck().all() as string[]).map((f) => join(dataDir, 'packs', f));
  } finally {
    db.close();
  }
}

/** The entry header as a version 1 receiver wrote it, computed here independently of receiver/pack-store.ts. */
function legacyHeader(e: Entry, envelope: Buffer): Buffer {
  const header = Buffer.alloc(ENTRY_HEADER);
  header.write('TMPE', 0, 'latin1');
  header.writeUInt32BE(envelope.length, 4);
  e.id.copy(header, 8);
  const sum = xxh3.xxh128(envelope);
  header.writeBigUInt64BE(sum >> 64n, 40);
  header.writeBigUInt64BE(sum & 0xffffffffffffffffn, 48);
  return header;
}

/** What a version 2 entry header must be: "TMPF", length, id, XXH64 big-endian, 8 zero bytes. */
function currentHeader(e: Entry, envelope: Buffer): Buffer {
  const header = Buffer.alloc(ENTRY_HEADER);
  header.write('TMPF', 0, 'latin1');
  header.writeUInt32BE(envelope.length, 4);
  e.id.copy(header, 8);
  header.writeBigUInt64BE(xxh64(envelope), 40);
  return header;
}

function assertCurrentFormat(dataDir: string, what: string): void {
  for (const path of packPaths(dataDir)) assert.equal(readAt(path, 4, 1)[0], 2, `${what}: pack ${path} is version 2`);
  for (const e of entries(dataDir)) {
    const envelope = readAt(e.path, e.offset + ENTRY_HEADER, e.length);
    assert.ok(readAt(e.path, e.offset, ENTRY_HEADER).equals(currentHeader(e, envelope)), `${what}: entry at ${e.path}:${e.offset} is a version 2 entry`);
  }
}

describe('version 1 packs', () => {
  let d: Deployment;
  let disk: string;
  const images = new Map<number, string>();
  const restore = (pointId: number, to: string) =>
    runCli('restore', ['disk', ...d.restoreArgs('old'), '--disk', disk, '--point', String(pointId), '--to', to], { TIDEMARK_TOKEN: d.restoreToken });
  const assertRestores = async (pointId: number) => {
    const out = join(d.root, `restored-${pointId}-${Date.now()}.img`);
    const result = await restore(pointId, out);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(await sha256File(out), await sha256File(images.get(pointId)!), `point ${pointId} restores byte-identical`);
  };
  const sync = async () => {
    const { pointId } = await d.syncOnce('old', [disk]);
    images.set(pointId, join(d.root, `point-${pointId}.img`));
    copyFileSync(disk, images.get(pointId)!);
    return pointId as number;
  };

  before(async () => {
    d = await Deployment.start();
    await d.enroll('old');
    disk = join(d.root, 'old.img');
    await writeMixedImage(disk, 8 * MiB, 31);
    await sync();
    await sleep(2500); // the idle pack is sealed: the second point's chunks go to a pack of their own
    await changeBlocks(disk, 64 * 1024, 100, 32);
    await sync();
    assertCurrentFormat(d.receiver.dataDir, 'as written');

    // Turn the data directory into what a version 1 receiver left behind.
    await d.receiver.stop();
    for (const path of packPaths(d.receiver.dataDir)) writeAt(path, 4, Buffer.from([1]));
    for (const e of entries(d.receiver.dataDir)) writeAt(e.path, e.offset, legacyHeader(e, readAt(e.path, e.offset + ENTRY_HEADER, e.length)));
    const markerPath = join(d.receiver.dataDir, 'receiver.json');
    writeFileSync(markerPath, JSON.stringify({ ...JSON.parse(readFileSync(markerPath, 'utf8')), version: 1 }));
    // The first point is ten days old: retention will drop it, and compaction rewrite its pack.
    const db = new Database(join(d.receiver.dataDir, 'catalog.db'));
    db.prepare('UPDATE point SET committed_ms = ? WHERE id = ?').run(Date.now() - 10 * 86_400_000, Math.min(...images.keys()));
    db.close();
    await d.receiver.restart();
  });
  after(() => d?.close());

  it('restore and verify read them; serve marked the data directory version 2', async () => {
    assert.equal(JSON.parse(readFileSync(join(d.receiver.dataDir, 'receiver.json'), 'utf8')).version, 2);
    for (const pointId of images.keys()) await assertRestores(pointId);
    const report = await runJson('receiver', ['verify', '--data', d.receiver.dataDir]);
    assert.equal(report.ok, true, JSON.stringify(report.damaged));
    assert.equal(report.chunksChecked, entries(d.receiver.dataDir).length);
  });

  it('a damaged version 1 entry is still found: verify names it, restore fails closed', async () => {
    const [victim] = entries(d.receiver.dataDir).slice(-1);
    const undo = flipByte(victim!.path, victim!.offset + ENTRY_HEADER + 40);
    try {
      const result = await runCli('receiver', ['verify', '--data', d.receiver.dataDir, '--json']);
      assert.equal(result.code, 5, result.stderr);
      const report = JSON.parse(result.stdout);
      assert.deepEqual(report.damaged.map((x: any) => [x.chunkId, x.offset]), [[victim!.id.toString('hex'), victim!.offset]]);
      assert.match(report.damaged[0].message, /checksum mismatch/);
      const restored = await restore(Math.max(...images.keys()), join(d.root, 'damaged.img'));
      assert.equal(restored.code, 5, restored.stderr);
      assert.match(restored.stderr, /damaged \(checksum mismatch\)/);
    } finally {
      undo();
    }
  });

  it('new chunks go to version 2 packs; compaction rewrites a version 1 pack as version 2', async () => {
    await changeBlocks(disk, 64 * 1024, 20, 33);
    const third = await sync();
    const fresh = entries(d.receiver.dataDir).filter((e) => readAt(e.path, e.offset, 4).toString('latin1') === 'TMPF');
    assert.ok(fresh.length > 0 && fresh.length <= 20, `the third point's chunks are version 2 entries (${fresh.length})`);

    const legacyBefore = packPaths(d.receiver.dataDir).filter((p) => readAt(p, 4, 1)[0] === 1);
    const report = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, '--keep-within', '1d', '--keep-hourly', '0', '--keep-daily', '0', '--keep-weekly', '0']);
    assert.equal(report.pointsDropped, 1);
    assert.ok(report.packsCompacted >= 1, 'the first point\'s pack was compacted');
    const [first, ...kept] = [...images.keys()].sort((a, b) => a - b);
    images.delete(first!);
    assert.ok(kept.includes(third));
    // The first point's version 1 pack is gone, its live entries copied into a version 2 pack;
    // no pack mixes formats: a version 1 pack holds only TMPE entries, a version 2 pack only TMPF.
    const legacyAfter = packPaths(d.receiver.dataDir).filter((p) => readAt(p, 4, 1)[0] === 1);
    assert.ok(legacyAfter.length < legacyBefore.length, `version 1 packs: ${legacyBefore.length} before, ${legacyAfter.length} after`);
    for (const e of entries(d.receiver.dataDir)) {
      const magic = readAt(e.path, e.offset, 4).toString('latin1');
      assert.equal(magic, readAt(e.path, 4, 1)[0] === 1 ? 'TMPE' : 'TMPF', `entry at ${e.path}:${e.offset}`);
    }
    for (const pointId of kept) await assertRestores(pointId);
    const verify = await runJson('receiver', ['verify', '--data', d.receiver.dataDir]);
    assert.equal(verify.ok, true, JSON.stringify(verify.damaged));
  });
});
