// Real block devices: protect a loop device holding ext4, restore it to an
// image file and onto another loop device, and check the filesystem.
// Needs root and losetup; elsewhere it skips with the reason.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, attachLoop, runCli } from '../test/harness.js';
import { sha256File, writeExt4Image } from '../test/fixtures.js';

const MiB = 1024 * 1024;

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
if (skip) console.log(`# native-tests/loop-device: skipped: ${skip}`);

describe('loop devices', { skip }, () => {
  let d: Deployment;
  const attached: string[] = [];
  const attach = (image: string) => {
    const device = attachLoop(image);
    attached.push(device);
    return device;
  };

  before(async () => {
    d = await Deployment.start();
    await d.enroll('metal');
  });
  after(async () => {
    for (const device of attached) execFileSync('losetup', ['-d', device]);
    await d.close();
  });

  it('an ext4 loop device round-trips to an image and onto another device', async () => {
    const image = join(d.root, 'source.img');
    await writeExt4Image(image, 64 * MiB, 5);
    const source = attach(image);
    const result = await d.syncOnce('metal', [source]);
    assert.equal(result.crashConsistent, true);
    const [point] = await d.points('metal');
    assert.equal(point.disks[0].name, source);
    assert.equal(point.disks[0].sizeBytes, 64 * MiB);

    const restoredImage = join(d.root, 'restored.img');
    await d.restore('metal', source, point.id, restoredImage);
    assert.equal(await sha256File(restoredImage), await sha256File(source));
    execFileSync('e2fsck', ['-fn', restoredImage], { stdio: 'ignore' }); // throws on a damaged filesystem

    // Onto a device full of other data: zero blocks must be written too.
    const scratch = join(d.root, 'scratch.img');
    execFileSync('dd', ['if=/dev/urandom', `of=${scratch}`, 'bs=1M', 'count=64', 'status=none']);
    const target = attach(scratch);
    await d.restore('metal', source, point.id, target);
    assert.equal(await sha256File(target), await sha256File(source));
  });

  it('scan without paths lists the block devices, and skips one it cannot read, saying why', async () => {
    const image = join(d.root, 'scanned.img');
    await writeExt4Image(image, 32 * MiB, 3);
    const device = attach(image);
    const unreadable = unreadableBlockDevice();
    const listing = await runCli('agent', ['scan', '--json']);
    assert.equal(listing.code, 0, listing.stderr);
    const { disks, skipped } = JSON.parse(listing.stdout);
    const scanned = disks.find((x: { path: string }) => x.path === device);
    assert.ok(scanned, `${device} is listed`);
    assert.equal(scanned.sizeBytes, 32 * MiB);
    assert.ok(scanned.dataBytes > 0 && scanned.dataBytes < 32 * MiB, `data bytes measured (${scanned.dataBytes})`);
    if (unreadable === undefined) return console.log('# no unreadable block device here: only the listing is checked');
    assert.deepEqual(skipped.map((x: { path: string }) => x.path), [unreadable]);
    assert.match(skipped[0].reason, /cannot open disk/);
    const text = await runCli('agent', ['scan']);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, new RegExp(`^${device}\tblock\t`, 'm'));
    assert.match(text.stderr, new RegExp(`^tidemark-agent: skipped ${unreadable}: `, 'm'));
  });
});

/**
 * A device of /sys/block that even root cannot open (here the sandbox's device policy denies
 * /dev/vda), or undefined: no portable way makes one, so the test uses what the machine has.
 */
function unreadableBlockDevice(): string | undefined {
  for (const name of readdirSync('/sys/block').sort()) {
    if (/^(ram|zram|loop)\d/.test(name)) continue;
    const path = `/dev/${name}`;
    try {
      closeSync(openSync(path, 'r'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EPERM' || (err as NodeJS.ErrnoException).code === 'EACCES') return path;
    }
  }
  return undefined;
}
