// tidemark-receiver forget: retention keeps the last point of every disk for
// ever, so a disk or a host taken out of protection gives its space back only
// when the operator says so. Real receiver, agent and restore processes.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, runCli, runJson } from './harness.js';

const BLOCK = 64 * 1024;

describe('tidemark-receiver forget', () => {
  it('removes one disk of a host, then the host, and prune frees what only they used', { timeout: 180_000 }, async () => {
    const d = await Deployment.start();
    try {
      const state = await d.enroll('h');
      const [kept, gone] = ['kept.img', 'gone.img'].map((name) => join(d.root, name)) as [string, string];
      writeFileSync(kept, randomBytes(8 * BLOCK));
      writeFileSync(gone, randomBytes(5 * BLOCK));
      const both = await d.syncOnce('h', [kept, gone]);
      const changed = readFileSync(kept);
      randomBytes(BLOCK).copy(changed, 0); // a later point of the kept disk alone
      writeFileSync(kept, changed);
      const later = await d.syncOnce('h', [kept]);
      const goneChanged = readFileSync(gone);
      randomBytes(BLOCK).copy(goneChanged, 0);
      writeFileSync(gone, goneChanged);
      await d.syncOnce('h', [gone]); // a point of the forgotten disk alone: it goes with the disk
      const data = ['--data', d.receiver.dataDir];

      assert.equal((await runCli('receiver', ['forget', ...data, '--host', 'h'])).code, 2, 'nothing named to forget');
      const typo = await runCli('receiver', ['forget', ...data, '--host', 'h', '--disk', 'nope']);
      assert.equal(typo.code, 9, typo.stderr);
      assert.match(typo.stderr, /no disk named "nope"; tidemark-receiver status lists its disks/);
      assert.equal((await runCli('receiver', ['forget', ...data, '--host', 'nobody', '--all'])).code, 9);

      const before = await d.receiver.status();
      const forgetDisk = ['forget', ...data, '--host', 'h', '--disk', gone, '--json'];
      const plan = await runJson('receiver', [...forgetDisk, '--dry-run']);
      assert.equal((await d.points('h')).length, 3, 'a dry run changes nothing');
      const forgotDisk = await runJson('receiver', forgetDisk);
      assert.deepEqual(forgotDisk, { dryRun: false, host: 'h', disks: [gone], hostRemoved: false, pointsRemoved: 1, blockVersionsRemoved: 6 });
      assert.deepEqual({ ...plan, dryRun: false }, forgotDisk, 'the dry run said what forget did');
      const points = await d.points('h');
      assert.deepEqual(points.map((p) => [p.id, p.disks.map((x: { name: string }) => x.name)]), [[both.pointId, [kept]], [later.pointId, [kept]]]);
      const restored = join(d.root, 'restored.img');
      await d.restore('h', kept, later.pointId, restored);
      assert.ok(readFileSync(restored).equals(readFileSync(kept)), 'the other disk still restores');
      const noDisk = await runCli('restore', ['disk', ...d.restoreArgs('h'), '--disk', gone, '--point', String(both.pointId), '--to', join(d.root, 'x.img')], { TIDEMARK_TOKEN: d.restoreToken });
      assert.equal(noDisk.code, 9, noDisk.stderr);

      const pruned = await runJson('receiver', ['prune', ...data, '--json']);
      assert.equal(pruned.chunksFreed, 6, "prune frees the forgotten disk's chunks");
      assert.equal((await d.receiver.status()).storedChunks, before.storedChunks - 6);

      // Protected again, the disk starts afresh.
      const again = await d.syncOnce('h', [kept, gone]);
      assert.equal(again.chunksUploaded, 5);
      await d.restore('h', gone, again.pointId, join(d.root, 'gone-again.img'));
      assert.ok(readFileSync(join(d.root, 'gone-again.img')).equals(readFileSync(gone)));

      const forgotHost = await runJson('receiver', ['forget', ...data, '--host', 'h', '--all', '--json']);
      assert.deepEqual(forgotHost, { dryRun: false, host: 'h', disks: [gone, kept], hostRemoved: true, pointsRemoved: 3, blockVersionsRemoved: 14 });
      const status = await d.receiver.status();
      assert.deepEqual(status.hosts, [], 'the host is gone');
      const refused = await runCli('agent', ['run', '--once', '--state', state, '--disk', kept]);
      assert.equal(refused.code, 6, `the host's credential stops working: ${refused.stderr}`);
      await runJson('receiver', ['prune', ...data, '--json']);
      assert.equal((await d.receiver.status()).storedChunks, 0, 'no chunk is left');
      const token = await d.receiver.token();
      const enrolled = await runCli('agent', d.enrollArgs(join(d.root, 'state-again'), 'h', d.keyFile), { TIDEMARK_TOKEN: token });
      assert.equal(enrolled.code, 0, `the name is free again: ${enrolled.stderr}`);
    } finally {
      await d.close();
    }
  });
});
