// Restore targets this host cannot write, made real: a read-only filesystem, a
// read-only loop device, a full filesystem. Each mode fails with one line that
// names the target: exit 12 for a target that cannot be written, 11 for a full
// disk in every mode (as for the receiver's). Needs root (mount, losetup);
// elsewhere it skips with the reason.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, attachLoop, collectGuarded, spawnCli, type CliResult } from '../test/harness.js';
import { writeMixedImage } from '../test/fixtures.js';

const MiB = 1024 * 1024;
const HOST = 'lambda';

function oneLine(result: CliResult): string {
  assert.notEqual(result.signal, 'SIGKILL', 'the command hung');
  const lines = result.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `expected a one-line error, got:\n${result.stderr}`);
  return lines[0]!;
}

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (mount, loop devices)';
  try {
    execFileSync('losetup', ['--version'], { stdio: 'ignore' });
    execFileSync('blockdev', ['--help'], { stdio: 'ignore' });
  } catch {
    return 'needs losetup and blockdev (util-linux)';
  }
  return undefined;
}

const skip = skipReason();
if (skip) console.log(`# native-tests/restore-target: skipped: ${skip}`);

describe('restore targets this host cannot write', { skip }, () => {
  let d: Deployment;
  let disk: string;
  let pointId: number;
  const mounts: string[] = [];
  const devices: string[] = [];
  const restore = (args: string[]) => collectGuarded(spawnCli('restore', args, { TIDEMARK_TOKEN: d.restoreToken }));
  const tmpfs = (name: string, options: string) => {
    const dir = join(d.root, name);
    mkdirSync(dir);
    execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'tidemark-test', dir]);
    mounts.push(dir);
    return dir;
  };

  before(async () => {
    d = await Deployment.start();
    await d.enroll(HOST);
    disk = join(d.root, 'lambda.img');
    await writeMixedImage(disk, 8 * MiB, 41);
    pointId = (await d.syncOnce(HOST, [disk])).pointId;
  });
  after(async () => {
    for (const dir of mounts) execFileSync('umount', [dir]);
    for (const device of devices) {
      execFileSync('blockdev', ['--setrw', device]); // the flag outlives losetup -d: the next user of the device would get it
      execFileSync('losetup', ['-d', device]);
    }
    await d?.close();
  });

  const point = () => ['--point', String(pointId)];
  /** disk, export and drill, each writing into `dir`. */
  const everyMode = async (dir: string) => [
    await restore(['disk', ...d.restoreArgs(HOST), ...point(), '--disk', disk, '--to', join(dir, 'x.img')]),
    await restore(['export', ...d.restoreArgs(HOST), ...point(), '--to', join(dir, 'x.tar')]),
    await restore(['drill', ...d.restoreArgs(HOST), ...point(), '--check', 'true {image}', '--scratch', dir]),
  ];

  it('a read-only filesystem: disk, export and drill exit 12 naming the path', async () => {
    const ro = tmpfs('ro', 'ro,size=1m');
    const runs = await everyMode(ro);
    for (const run of runs) {
      assert.equal(run.code, 12, run.stderr);
      assert.match(oneLine(run), new RegExp(`cannot write ${ro}\\S*: read-only file system; remount it read-write or choose another --(to|scratch)$`));
    }
  });

  it('a read-only block device: exit 12, "read-only device"', async () => {
    const backing = join(d.root, 'ro-device.img');
    writeFileSync(backing, '');
    truncateSync(backing, 8 * MiB);
    const device = attachLoop(backing);
    devices.push(device);
    execFileSync('blockdev', ['--setro', device]);
    const run = await restore(['disk', ...d.restoreArgs(HOST), ...point(), '--disk', disk, '--to', device]);
    assert.equal(run.code, 12, run.stderr);
    assert.equal(oneLine(run), `tidemark-restore: cannot write to ${device}: read-only device; make it writable (blockdev --setrw ${device}) or choose another --to`);
  });

  it('a full filesystem: disk, export and drill all exit 11 (storage full), and leave nothing behind', async () => {
    const small = tmpfs('small', 'size=1m');
    const runs = await everyMode(small);
    for (const run of runs) {
      assert.equal(run.code, 11, run.stderr);
      assert.match(oneLine(run), /disk full: no space left on device .*free space on that filesystem and retry$/);
    }
    assert.deepEqual(readdirSync(small), []);
  });
});
