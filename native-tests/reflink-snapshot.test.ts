// Reflink snapshots of image files (agent/image-snapshot.ts): an image on a
// real XFS filesystem (loop device), written to all the time by ordered
// writes, is synced by hash scan. Every point must come from a clone: crash-
// consistent after one pass, and holding a prefix of the writes. A pass that
// read the live image instead would pick up some writes and miss earlier ones
// (the workload scrambles the order of its slots), and the converging passes
// of the live path cannot settle under this load.
// Needs root, losetup and mkfs.xfs (xfsprogs); elsewhere it skips with the reason.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { snapshotPath } from '../agent/image-snapshot.js';
import { Deployment, attachLoop, collect } from '../test/harness.js';
import { sha256File } from '../test/fixtures.js';
import { chainGap, chainSlots, newestChainWrite } from './workload.js';

const MiB = 1024 * 1024;
const WORKLOAD = fileURLToPath(new URL('./workload.js', import.meta.url));
const SLOTS = 128;
const STRIDE = 128 * 1024;

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (loop devices, mount)';
  try {
    execFileSync('losetup', ['--version'], { stdio: 'ignore' });
    execFileSync('mkfs.xfs', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'needs losetup and mkfs.xfs (util-linux, xfsprogs)';
  }
  return undefined;
}

const skip = skipReason();
if (skip) console.log(`# native-tests/reflink-snapshot: skipped: ${skip}`);

describe('reflink snapshots of image files', { skip, timeout: 180_000 }, () => {
  let d: Deployment;
  let device: string | undefined;
  let mnt: string;
  let image: string;

  before(async () => {
    d = await Deployment.start();
    await d.enroll('vm-host');
    const backing = join(d.root, 'xfs.img');
    writeFileSync(backing, '');
    truncateSync(backing, 512 * MiB);
    device = attachLoop(backing);
    execFileSync('mkfs.xfs', ['-q', '-m', 'reflink=1', device]);
    mnt = join(d.root, 'mnt');
    mkdirSync(mnt);
    execFileSync('mount', [device, mnt]);
    image = join(mnt, 'vm.img');
    writeFileSync(image, '');
    truncateSync(image, SLOTS * STRIDE);
  });
  after(async () => {
    if (mnt && existsSync(mnt)) execFileSync('umount', [mnt]);
    if (device) execFileSync('losetup', ['-d', device]);
    await d?.close();
  });

  it('under ordered writes, every point is read from a clone: crash-consistent in one pass, holding a prefix of the writes', async (t) => {
    const first = await d.syncOnce('vm-host', [image]);
    assert.equal(first.snapshot, true, 'the initial sync read a clone');

    const workload = spawn(process.execPath, [WORKLOAD, '--device', image, '--mode', 'chain', '--seconds', '10', '--slots', String(SLOTS), '--stride', String(STRIDE)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const finished = collect(workload);
    const points = [];
    try {
      await new Promise((r) => setTimeout(r, 500));
      for (let i = 0; i < 4; i++) points.push(await d.syncOnce('vm-host', [image]));
    } finally {
      workload.kill('SIGTERM');
      const done = await finished;
      assert.equal(done.code, 0, done.stderr);
    }
    let previous = -1;
    for (const p of points) {
      assert.equal(p.snapshot, true, `point ${p.pointId} read a clone`);
      assert.equal(p.crashConsistent, true, `point ${p.pointId} is crash-consistent`);
      assert.equal(p.passes, 1, `point ${p.pointId} needed one pass`);
      const restored = join(d.root, `restored-${p.pointId}.img`);
      await d.restore('vm-host', image, p.pointId, restored);
      const held = chainSlots(readFileSync(restored), SLOTS, STRIDE);
      rmSync(restored);
      assert.equal(chainGap(held), null, `point ${p.pointId} (cut ${p.time}) is not a state the image was in`);
      const newest = newestChainWrite(held);
      assert.ok(newest >= previous, `point ${p.pointId} holds writes up to ${newest}, an earlier point up to ${previous}`);
      previous = newest;
    }
    assert.ok(previous > SLOTS, `the points caught the writes as they went on (the newest holds writes 0..${previous})`);
    t.diagnostic(`${points.length} points under load; the newest holds writes 0..${previous}`);

    // Quiet again: the newest point is the image, and no clone is left beside it.
    const last = await d.syncOnce('vm-host', [image]);
    const restored = join(d.root, 'last.img');
    await d.restore('vm-host', image, last.pointId, restored);
    assert.equal(await sha256File(restored), await sha256File(image));
    assert.equal(existsSync(snapshotPath(image)), false);
    assert.deepEqual(readdirSync(mnt), ['vm.img']);
  });

  it('two images are cloned as one group', async () => {
    const second = join(mnt, 'vm-data.img');
    writeFileSync(second, Buffer.alloc(4 * MiB, 7));
    try {
      const result = await d.syncOnce('vm-host', [image, second]);
      assert.equal(result.snapshot, true);
      assert.equal(result.crashConsistent, true);
      const restored = join(d.root, 'second.img');
      await d.restore('vm-host', second, result.pointId, restored);
      assert.equal(await sha256File(restored), await sha256File(second));
      assert.deepEqual(readdirSync(mnt).sort(), ['vm-data.img', 'vm.img']);
    } finally {
      rmSync(second, { force: true });
    }
  });

  it('--snapshot off reads the live image', async () => {
    const result = await d.syncOnce('vm-host', [image], ['--snapshot', 'off']);
    assert.equal(result.snapshot, false);
    assert.equal(result.crashConsistent, true, 'no writer: the live passes settle');
  });
});
