// Failback onto a real block device: the target is read with O_DIRECT and
// only the blocks that differ from the point are written. Needs root and
// losetup; elsewhere it skips with the reason.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, writeSync, fsyncSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, attachLoop, runCli } from '../test/harness.js';
import { sha256File, writeExt4Image } from '../test/fixtures.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (loop devices)';
  try {
    execFileSync('losetup', ['--version'], { stdio: 'ignore' });
    execFileSync('mkfs.ext4', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'needs losetup and mkfs.ext4 (util-linux, e2fsprogs)';
  }
  return undefined;
}

const skip = skipReason();
if (skip) console.log(`# native-tests/failback-device: skipped: ${skip}`);

describe('failback onto a loop device', { skip }, () => {
  let d: Deployment;
  const attached: string[] = [];
  const attach = (image: string) => {
    const device = attachLoop(image);
    attached.push(device);
    return device;
  };

  before(async () => {
    d = await Deployment.start();
    await d.enroll('iron');
  });
  after(async () => {
    for (const device of attached) execFileSync('losetup', ['-d', device]);
    await d.close();
  });

  it('writes only the changed blocks and leaves the device equal to the point', async () => {
    const image = join(d.root, 'source.img');
    await writeExt4Image(image, 32 * MiB, 9);
    const device = attach(image);
    const result = await d.syncOnce('iron', [device]);
    const shaAtPoint = await sha256File(device);

    // Damage 5 blocks through the device itself (no filesystem mounted).
    const changed = [3, 77, 130, 260, 511];
    const fd = openSync(device, 'r+');
    for (const block of changed) writeSync(fd, randomBytes(BLOCK), 0, BLOCK, block * BLOCK);
    fsyncSync(fd);
    closeSync(fd);
    assert.notEqual(await sha256File(device), shaAtPoint);

    const run = await runCli('restore', ['disk', ...d.restoreArgs('iron'), '--disk', device, '--point', String(result.pointId),
      '--to', device, '--failback', '--json'], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(run.code, 0, run.stderr);
    const report = JSON.parse(run.stdout);
    assert.equal(report.blocksCompared, 512);
    assert.equal(report.bytesWritten, changed.length * BLOCK);
    assert.equal(await sha256File(device), shaAtPoint);
    execFileSync('e2fsck', ['-fn', device], { stdio: 'ignore' }); // throws on a damaged filesystem
  });

  it('refuses a mounted device, with failback and without, and leaves it untouched', async () => {
    const image = join(d.root, 'mounted.img');
    await writeExt4Image(image, 16 * MiB, 12);
    const device = attach(image);
    const result = await d.syncOnce('iron', [device]);
    const mnt = join(d.root, 'mnt');
    mkdirSync(mnt, { recursive: true });
    execFileSync('mount', ['-o', 'ro', device, mnt]);
    try {
      const before = await sha256File(device);
      for (const extra of [['--failback'], []]) {
        const run = await runCli('restore', ['disk', ...d.restoreArgs('iron'), '--disk', device, '--point', String(result.pointId), '--to', device, ...extra],
          { TIDEMARK_TOKEN: d.restoreToken });
        assert.equal(run.code, 10, `restore ${extra.join(' ')} onto a mounted device: ${run.stderr}`);
        assert.match(run.stderr, /in use .*unmount it/);
        assert.equal(run.stderr.trim().split('\n').length, 1, run.stderr);
      }
      assert.equal(await sha256File(device), before, 'nothing was written');
    } finally {
      execFileSync('umount', [mnt]);
    }
  });
});
