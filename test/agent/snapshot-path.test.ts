// The reflink clone of an image file is made at a fixed name beside the image
// (agent/image-snapshot.ts). The agent runs as root; the image's directory may be
// writable by others (the VM's user). A symlink planted at that name must not be
// written through: before the fix, copyFile truncated its target and gave it the
// image's mode (then failed to clone on ext4, or cloned the disk into it on XFS).
// Here on any filesystem: the clone is tried (and fails where reflinks are not
// supported, as in this test's temp directory), the sync goes on with live reads.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { snapshotPath } from '../../agent/image-snapshot.js';
import { DiskReader } from '../../shared/disk-reader.js';
import { Deployment } from '../harness.js';
import { writeMixedImage } from '../fixtures.js';

describe('a symlink at the snapshot name', () => {
  let d: Deployment;
  before(async () => {
    d = await Deployment.start();
    await d.enroll('vmhost');
  });
  after(() => d?.close());

  it('is removed, not written through; the sync goes on', async () => {
    const vmDir = join(d.root, 'vm');
    mkdirSync(vmDir);
    const image = join(vmDir, 'disk.img');
    await writeMixedImage(image, 1024 * 1024, 5);
    chmodSync(image, 0o644);
    const victim = join(d.root, 'shadow');
    writeFileSync(victim, 'root:$6$secret:20000:0:99999:7:::\n', { mode: 0o600 });
    symlinkSync(victim, snapshotPath(image));

    const point = await d.syncOnce('vmhost', [image]);
    assert.ok(point.pointId > 0);
    assert.equal(readFileSync(victim, 'utf8'), 'root:$6$secret:20000:0:99999:7:::\n', 'the symlink\'s target is untouched');
    assert.equal(statSync(victim).mode & 0o777, 0o600, 'and keeps its mode');
    assert.ok(!existsSync(snapshotPath(image)) && !lstatExists(snapshotPath(image)), 'nothing is left at the snapshot name');
  });

  it('swapped in for a clone after it was made is not read through', async () => {
    // The sync reads a clone with noFollow (agent/sync.ts scanDisk); the swap itself is a race, so
    // this checks the reader: a link to a file the agent must not ship is refused.
    const victim = join(d.root, 'secret-file');
    writeFileSync(victim, 'not for the receiver');
    const clone = join(d.root, 'swapped.tidemark-snapshot');
    symlinkSync(victim, clone);
    await assert.rejects(DiskReader.open(clone, 65536, { noFollow: true }), { code: 'ELOOP' });
    const followed = await DiskReader.open(clone, 65536);
    await followed.close();
  });
});

function lstatExists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}
