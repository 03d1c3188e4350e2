// Mixed versions, each side a real build of its release (test/release.ts): the
// release before chunks.get beside this tree. An operator upgrades one machine
// at a time, and in a disaster may restore with a newer restore CLI than the
// receiver it reads from.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { CATALOG_VERSION } from '../receiver/catalog.js';
import { Deployment, REPO_ROOT, runCli, runJson } from './harness.js';
import { changeBlocks, sha256File, writeMixedImage } from './fixtures.js';
import { RELEASE_BEFORE_CHUNKS_GET, buildRelease, type Release } from './release.js';

const MiB = 1024 * 1024;

function catalogVersion(d: Deployment): unknown {
  const catalog = new Database(join(d.receiver.dataDir, 'catalog.db'), { readonly: true });
  try {
    return catalog.prepare(`SELECT value FROM meta WHERE key = 'catalog_version'`).pluck().get();
  } finally {
    catalog.close();
  }
}

describe('version skew with the release before chunks.get', { timeout: 300_000 }, () => {
  let release: Release;
  before(() => {
    release = buildRelease(RELEASE_BEFORE_CHUNKS_GET);
  });
  after(() => release?.remove());

  it('this restore CLI reads from a receiver of that release (one chunk.get per chunk): disk restore and verify', async () => {
    const d = await Deployment.start(release.root);
    try {
      await d.enroll('old-receiver');
      const disk = join(d.root, 'disk.img');
      await writeMixedImage(disk, 16 * MiB, 3);
      const { pointId } = await d.syncOnce('old-receiver', [disk]);
      const out = join(d.root, 'restored.img');
      const restored = await d.restore('old-receiver', disk, pointId, out);
      assert.equal(await sha256File(out), await sha256File(disk));
      assert.ok(restored.bytesFetched > 0);
      const verify = await runJson('restore', ['verify', ...d.restoreArgs('old-receiver'), '--read-data'], { TIDEMARK_TOKEN: d.restoreToken });
      assert.equal(verify.ok, true);
      assert.equal(verify.chunksChecked, (await d.receiver.status()).storedChunks);
      // That receiver does not say whether a host exists: an unknown one lists no points, as before.
      const unknown = await runJson('restore', ['points', ...d.restoreArgs('no-such-host')], { TIDEMARK_TOKEN: d.restoreToken });
      assert.deepEqual(unknown.points, []);
    } finally {
      await d.close();
    }
  });

  it('this receiver serves a data directory written by that release: old points restore, verify is clean, syncs go on', async () => {
    const d = await Deployment.start(release.root);
    try {
      await d.enroll('upgraded');
      const disk = join(d.root, 'disk.img');
      await writeMixedImage(disk, 16 * MiB, 5);
      const before = join(d.root, 'before.img');
      copyFileSync(disk, before);
      const first = await d.syncOnce('upgraded', [disk]);
      const written = await d.receiver.status();
      await d.receiver.stop();
      // verify only reads: it names the command that upgrades, and leaves the directory as it was.
      const early = await runCli('receiver', ['verify', '--data', d.receiver.dataDir]);
      assert.notEqual(early.code, 0);
      assert.match(early.stderr, /catalog .* is version 1, from an earlier release; start tidemark-receiver serve \(or run prune\) once to upgrade it/);
      assert.equal(catalogVersion(d), '1');
      await d.receiver.restart('SIGTERM', REPO_ROOT);
      // Its catalog (version 1) was upgraded in place, every chunk row carried over.
      const upgraded = await d.receiver.status();
      assert.equal(upgraded.storedChunks, written.storedChunks);
      assert.equal(upgraded.storedChunkBytes, written.storedChunkBytes);
      assert.equal(catalogVersion(d), String(CATALOG_VERSION));
      const restored = join(d.root, 'first.img');
      await d.restore('upgraded', disk, first.pointId, restored);
      assert.equal(await sha256File(restored), await sha256File(before));
      const changed = await changeBlocks(disk, 64 * 1024, 5, 6);
      const second = await d.syncOnce('upgraded', [disk]);
      assert.equal(second.blocksChanged, changed.length);
      const receiverVerify = await runJson('receiver', ['verify', '--data', d.receiver.dataDir]);
      assert.equal(receiverVerify.ok, true);
      const restoreVerify = await runJson('restore', ['verify', ...d.restoreArgs('upgraded'), '--read-data'], { TIDEMARK_TOKEN: d.restoreToken });
      assert.equal(restoreVerify.ok, true);
      const again = join(d.root, 'first-again.img');
      await d.restore('upgraded', disk, first.pointId, again);
      assert.equal(await sha256File(again), await sha256File(before));
      const latest = join(d.root, 'second.img');
      await d.restore('upgraded', disk, second.pointId, latest);
      assert.equal(await sha256File(latest), await sha256File(disk));
    } finally {
      await d.close();
    }
  });

  it('that release\'s agent and restore CLI work with this receiver, and this restore CLI reads what that agent wrote', async () => {
    const d = await Deployment.start();
    try {
      await d.enroll('old-agent', d.keyFile, release.root);
      const disk = join(d.root, 'disk.img');
      await writeMixedImage(disk, 16 * MiB, 4);
      const { pointId } = await d.syncOnce('old-agent', [disk], [], release.root);
      const byOld = join(d.root, 'by-old.img');
      await d.restore('old-agent', disk, pointId, byOld, release.root);
      assert.equal(await sha256File(byOld), await sha256File(disk));
      const byNew = join(d.root, 'by-new.img');
      await d.restore('old-agent', disk, pointId, byNew);
      assert.equal(await sha256File(byNew), await sha256File(disk));
      // That restore CLI ignores hostExists in this receiver's points.list reply.
      const listed = await runJson('restore', ['points', ...d.restoreArgs('old-agent')], { TIDEMARK_TOKEN: d.restoreToken }, release.root);
      assert.deepEqual(listed.points.map((p: any) => p.id), [pointId]);
      const unknown = await runJson('restore', ['points', ...d.restoreArgs('no-such-host')], { TIDEMARK_TOKEN: d.restoreToken }, release.root);
      assert.deepEqual(unknown.points, []);
    } finally {
      await d.close();
    }
  });
});
