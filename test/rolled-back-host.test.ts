// A host rolled back together with its agent state (a VM snapshot or backup
// restored) holds hashes older than the receiver's newest point. Compared
// with them, a block that went back to its older content looks unchanged,
// and the next point would keep the newer content the receiver has: a point
// that restores to a disk that never existed. The receiver names its newest
// point of the disk at disk.register; the agent then compares every block.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { cpSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, runCli, lastEvent } from './harness.js';

const BLOCK = 64 * 1024;

describe('a host rolled back with its agent state', () => {
  it('gets a next point that is the disk as it is, not a mix with the newer point', { timeout: 120_000 }, async () => {
    const d = await Deployment.start();
    try {
      const state = await d.enroll('h');
      const image = join(d.root, 'h.img');
      const older = randomBytes(8 * BLOCK);
      writeFileSync(image, older);
      await d.syncOnce('h', [image]);
      const backup = join(d.root, 'state-backup');
      cpSync(state, backup, { recursive: true });

      const newer = Buffer.from(older);
      randomBytes(BLOCK).copy(newer, 3 * BLOCK);
      writeFileSync(image, newer);
      await d.syncOnce('h', [image]);

      // The rollback: the state directory and the disk as they were at the backup.
      rmSync(state, { recursive: true });
      cpSync(backup, state, { recursive: true });
      writeFileSync(image, older);
      const versionsBefore = (await d.receiver.status()).blockVersions;
      const run = await runCli('agent', ['run', '--once', '--json', '--state', state, '--disk', image], { TIDEMARK_LOG_LEVEL: 'warn' });
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stderr, /not the one this state last committed/, 'the agent says why it compares every block');
      const point = lastEvent(run.stdout, 'point');
      assert.equal(point.bytesRead, older.length, 'every block read and compared');
      // Every block was compared and staged, but the point records only the one that changed.
      const [listed] = (await d.points('h')).filter((p) => p.id === point.pointId);
      assert.equal(listed.disks[0].changedBytes, BLOCK, 'the point lists one changed block, not the whole disk');
      assert.equal((await d.receiver.status()).blockVersions - versionsBefore, 1, 'the catalog grew by one block version');

      const restored = join(d.root, 'restored.img');
      await d.restore('h', image, point.pointId, restored);
      assert.ok(readFileSync(restored).equals(older), 'the point is the disk as it was synced');

      // With the hashes now matching the receiver, the next sync is incremental again.
      const next = await d.syncOnce('h', [image]);
      assert.equal(next.blocksChanged, 0);
      assert.doesNotMatch((await runCli('agent', ['run', '--once', '--state', state, '--disk', image], { TIDEMARK_LOG_LEVEL: 'warn' })).stderr, /not the one this state last committed/);
    } finally {
      await d.close();
    }
  });
});
