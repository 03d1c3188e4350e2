// Restore modes end to end through real processes: failback onto a changed
// disk, tar export (to a file and to stdout), and drills with a check command.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, closeSync, writeSync, writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import tar from 'tar-stream';
import { Deployment, runCli, spawnCli, type CliResult } from './harness.js';
import { changeBlocks, sha256File, writeExt4Image, writeMixedImage } from './fixtures.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const HOST = 'omega';

/** Runs tidemark-restore with stdout kept as bytes (a tar). */
function runRestoreBinary(args: string[], env: Record<string, string>): Promise<CliResult & { stdoutBytes: Buffer }> {
  const child = spawnCli('restore', args, env);
  const out: Buffer[] = [];
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => out.push(d));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => child.on('close', (code, signal) => {
    const stdoutBytes = Buffer.concat(out);
    resolve({ code, signal, stdout: stdoutBytes.toString('latin1'), stderr, stdoutBytes });
  }));
}

interface TarContent {
  names: string[];
  sha256: Map<string, string>;
  sizes: Map<string, number>;
  manifest: any;
}

/** Reads a tar with tar-stream, hashing each entry as it streams. */
async function readTar(tarBytes: Buffer): Promise<TarContent> {
  const content: TarContent = { names: [], sha256: new Map(), sizes: new Map(), manifest: undefined };
  const extract = tar.extract();
  const done = new Promise<void>((resolve, reject) => extract.on('finish', resolve).on('error', reject));
  extract.on('entry', (header, stream, next) => {
    content.names.push(header.name);
    const hash = createHash('sha256');
    const parts: Buffer[] = [];
    let size = 0;
    stream.on('data', (data) => {
      const chunk = data as Buffer;
      hash.update(chunk);
      size += chunk.length;
      if (header.name === 'manifest.json') parts.push(chunk);
    });
    stream.on('end', () => {
      content.sha256.set(header.name, hash.digest('hex'));
      content.sizes.set(header.name, size);
      if (header.name === 'manifest.json') content.manifest = JSON.parse(Buffer.concat(parts).toString('utf8'));
      next();
    });
  });
  Readable.from([tarBytes]).pipe(extract);
  await done;
  return content;
}

function findE2fsck(): string {
  for (const candidate of ['e2fsck', '/usr/sbin/e2fsck', '/sbin/e2fsck']) {
    try {
      execFileSync(candidate, ['-V'], { stdio: 'ignore' });
      return candidate;
    } catch {
      // try the next
    }
  }
  throw new Error('e2fsck not found: install e2fsprogs');
}

function hasGnuTar(): boolean {
  try {
    execFileSync('tar', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe('restore modes', () => {
  let d: Deployment;
  let mixed: string;
  let ext4: string;
  let point1: number;
  let point2: number;
  const shaAtPoint1 = new Map<string, string>();
  let mixedAtPoint1: Buffer;
  let changedBlocks: number[];
  const env = () => ({ TIDEMARK_TOKEN: d.restoreToken });
  const restore = (args: string[], extraEnv: Record<string, string> = {}) => runCli('restore', args, { ...env(), ...extraEnv });

  before(async () => {
    d = await Deployment.start();
    await d.enroll(HOST);
    mixed = join(d.root, 'mixed.img');
    ext4 = join(d.root, 'ext4.img');
    await writeMixedImage(mixed, 64 * MiB, 21);
    await writeExt4Image(ext4, 32 * MiB, 22);
    point1 = (await d.syncOnce(HOST, [mixed, ext4])).pointId;
    for (const disk of [mixed, ext4]) shaAtPoint1.set(disk, await sha256File(disk));
    mixedAtPoint1 = readFileSync(mixed);
    changedBlocks = await changeBlocks(mixed, BLOCK, 10, 23); // ≈ 1 % of the 1024 blocks
    point2 = (await d.syncOnce(HOST, [mixed, ext4])).pointId;
  });
  after(() => d?.close());

  describe('failback', () => {
    it('writes only the blocks that differ and leaves the disk equal to the point', async () => {
      const target = join(d.root, 'failback-target.img');
      copyFileSync(mixed, target); // the disk as it is now: point 2
      // A local write the receiver never saw, on a block that is zero at point 1: it must become zeros again.
      const zeroBlock = findZeroBlock(mixedAtPoint1, changedBlocks);
      const fd = openSync(target, 'r+');
      writeSync(fd, randomBytes(BLOCK), 0, BLOCK, zeroBlock * BLOCK);
      closeSync(fd);
      const differing = changedBlocks.length + 1;

      const args = ['disk', ...d.restoreArgs(HOST), '--disk', mixed, '--point', String(point1), '--to', target, '--failback', '--json'];
      const first = await restore(args);
      assert.equal(first.code, 0, first.stderr);
      const result = JSON.parse(first.stdout);
      assert.equal(await sha256File(target), shaAtPoint1.get(mixed), 'the target equals point 1 byte for byte');
      assert.equal(result.point, point1);
      assert.equal(result.disk, mixed);
      assert.equal(result.blocksCompared, 1024, 'every block was compared');
      assert.ok(result.bytesWritten >= changedBlocks.length * BLOCK, `wrote at least the changed bytes (${result.bytesWritten})`);
      assert.ok(result.bytesWritten <= 0.02 * 64 * MiB, `wrote at most 2 % of the disk (${result.bytesWritten})`);
      assert.equal(result.bytesWritten, differing * BLOCK, 'exactly the differing blocks were written');
      assert.ok(result.bytesFetched > 0 && result.bytesFetched <= 0.02 * 64 * MiB, `fetched only differing blocks (${result.bytesFetched})`);

      const again = await restore(args);
      assert.equal(again.code, 0, again.stderr);
      const second = JSON.parse(again.stdout);
      assert.equal(second.bytesWritten, 0, 'a disk already at the point needs no write');
      assert.equal(second.bytesFetched, 0);
      assert.equal(second.blocksCompared, 1024);
    });

    it('refuses a target that is missing or smaller than the disk', async () => {
      const small = join(d.root, 'small.img');
      writeFileSync(small, '');
      truncateSync(small, 32 * MiB);
      for (const target of [small, join(d.root, 'missing.img')]) {
        const result = await restore(['disk', ...d.restoreArgs(HOST), '--disk', mixed, '--point', String(point1), '--to', target, '--failback']);
        assert.equal(result.code, 12, result.stderr);
        assert.equal(result.stderr.trim().split('\n').length, 1, result.stderr);
      }
      assert.equal(existsSync(join(d.root, 'missing.img')), false);
    });

    it('without --failback an existing image is still refused', async () => {
      const existing = join(d.root, 'failback-target-copy.img');
      copyFileSync(mixed, existing);
      const result = await restore(['disk', ...d.restoreArgs(HOST), '--disk', mixed, '--point', String(point1), '--to', existing]);
      assert.equal(result.code, 10, result.stderr);
    });
  });

  describe('export', () => {
    it('a tar holds every disk image at the point and a manifest with their SHA-256, last', async () => {
      const file = join(d.root, 'point1.tar');
      const run = await restore(['export', ...d.restoreArgs(HOST), '--point', String(point1), '--to', file, '--json']);
      assert.equal(run.code, 0, run.stderr);
      const summary = JSON.parse(run.stdout);
      assert.equal(summary.point, point1);
      assert.equal(existsSync(`${file}.partial`), false);

      const content = await readTar(readFileSync(file));
      const { manifest } = content;
      assert.equal(content.names.at(-1), 'manifest.json', 'manifest.json is the last entry');
      assert.equal(manifest.format, 'tidemark-export');
      assert.equal(manifest.host, HOST);
      assert.equal(manifest.point.id, point1);
      assert.equal(typeof manifest.point.crashConsistent, 'boolean');
      assert.deepEqual(manifest.disks.map((x: any) => x.name).sort(), [mixed, ext4].sort());
      assert.deepEqual(content.names.slice(0, -1), manifest.disks.map((x: any) => x.file));
      for (const disk of manifest.disks) {
        assert.match(disk.file, /^disks\/[A-Za-z0-9][A-Za-z0-9._-]*\.img$/);
        assert.equal(disk.blockBytes, BLOCK);
        assert.equal(content.sizes.get(disk.file), disk.sizeBytes);
        assert.equal(content.sha256.get(disk.file), shaAtPoint1.get(disk.name), `${disk.name} in the tar is the disk at point 1`);
        assert.equal(disk.sha256, shaAtPoint1.get(disk.name), 'the manifest checksum is the disk at point 1');
      }
      assert.deepEqual(summary.manifest, manifest);
      if (hasGnuTar()) assert.deepEqual(execFileSync('tar', ['-tf', file], { encoding: 'utf8' }).trim().split('\n'), content.names);

      // --to - streams the same tar to stdout, nothing else.
      const piped = await runRestoreBinary(['export', ...d.restoreArgs(HOST), '--at', manifest.point.time, '--to', '-'], env());
      assert.equal(piped.code, 0, piped.stderr);
      assert.ok(piped.stdoutBytes.equals(readFileSync(file)), 'stdout carries the same tar, byte for byte');
    });

    it('refuses an existing file and --json with stdout', async () => {
      const file = join(d.root, 'exists.tar');
      writeFileSync(file, 'keep me');
      const exists = await restore(['export', ...d.restoreArgs(HOST), '--point', String(point2), '--to', file]);
      assert.equal(exists.code, 10, exists.stderr);
      assert.equal(readFileSync(file, 'utf8'), 'keep me');
      const json = await restore(['export', ...d.restoreArgs(HOST), '--point', String(point2), '--to', '-', '--json']);
      assert.equal(json.code, 2, json.stderr);
      assert.equal(json.stdout, '');
    });
  });

  describe('drill', () => {
    const e2fsck = findE2fsck();

    it('passes on a good ext4 point and removes its scratch directory', async () => {
      const scratch = join(d.root, `scr atch 'dir`); // the image path needs quoting
      mkdirSync(scratch);
      const run = await restore(['drill', ...d.restoreArgs(HOST), '--point', String(point1), '--disk', ext4,
        '--check', `${e2fsck} -fn {image}`, '--scratch', scratch, '--json']);
      assert.equal(run.code, 0, run.stderr);
      const result = JSON.parse(run.stdout);
      assert.equal(result.point, point1);
      assert.equal(result.passed, true);
      assert.equal(result.disks.length, 1);
      assert.equal(result.disks[0].name, ext4);
      assert.equal(result.disks[0].exitCode, 0);
      assert.deepEqual(readdirSync(scratch), [], 'scratch directory removed');
    });

    it('reports each disk, fails when a check fails, and cleans up', async () => {
      const tmp = join(d.root, 'tmp-for-drill');
      mkdirSync(tmp);
      // Every disk: the ext4 one passes e2fsck, the mixed one is no filesystem.
      const run = await restore(['drill', ...d.restoreArgs(HOST), '--point', String(point1), '--check', `${e2fsck} -fn {image}`, '--json'], { TMPDIR: tmp });
      assert.equal(run.code, 1, run.stderr);
      assert.match(run.stderr.trim(), /^tidemark-restore: drill failed: .*mixed\.img/);
      assert.equal(run.stderr.trim().split('\n').length, 1, run.stderr);
      const result = JSON.parse(run.stdout);
      assert.equal(result.passed, false);
      const byName = new Map(result.disks.map((x: any) => [x.name, x]));
      const bad = byName.get(mixed) as any;
      const good = byName.get(ext4) as any;
      assert.equal(good.passed, true);
      assert.equal(bad.passed, false);
      assert.notEqual(bad.exitCode, 0);
      assert.ok(bad.output.length > 0, 'the failing check\'s output is reported');
      assert.deepEqual(readdirSync(tmp), [], 'scratch directory under TMPDIR removed');
    });

    it('reports the failing command\'s exit code and output in human form', async () => {
      const scratch = join(d.root, 'scratch-human');
      mkdirSync(scratch);
      const run = await restore(['drill', ...d.restoreArgs(HOST), '--at', new Date().toISOString(), '--disk', ext4,
        '--check', 'echo checking {image} "secret=${TIDEMARK_PASSPHRASE:-withheld}"; exit 3', '--scratch', scratch]);
      assert.equal(run.code, 1, run.stderr);
      assert.match(run.stdout, /FAIL .*ext4\.img \(exit 3\)/);
      assert.match(run.stdout, /\| checking .*scratch-human\/tidemark-drill-[^/]+\/[^/]*ext4\.img secret=withheld$/m);
      assert.match(run.stderr.trim(), /^tidemark-restore: drill failed: check did not pass on .*ext4\.img \(exit 3\)$/);
      assert.deepEqual(readdirSync(scratch), []);
    });

    it('kills a check that outlives --check-timeout, with the processes it started, and fails', async () => {
      const scratch = join(d.root, 'scratch-hang');
      mkdirSync(scratch);
      const marker = `sleep ${300 + (process.pid % 97)}`; // a command line no other process has
      const startedMs = Date.now();
      const run = await restore(['drill', ...d.restoreArgs(HOST), '--point', String(point1), '--disk', ext4,
        '--check', `: {image}; sh -c '${marker}'`, '--check-timeout', '2s', '--scratch', scratch, '--json']);
      assert.equal(run.code, 1, run.stderr);
      assert.match(run.stderr.trim(), /^tidemark-restore: drill failed: check did not pass on .*ext4\.img \(timed out\)$/);
      const result = JSON.parse(run.stdout);
      assert.equal(result.passed, false);
      assert.equal(result.disks[0].timedOut, true);
      assert.match(result.disks[0].output, /killed after 2 s/);
      assert.ok(Date.now() - startedMs < 60_000, 'the drill did not wait for the check');
      const left = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' }).split('\n').filter((line) => line.trim() === marker);
      assert.deepEqual(left, [], 'the check\'s own children were killed too');
      assert.deepEqual(readdirSync(scratch), []);
    });

    it('a check that exits 0 and leaves a process holding its output passes at its exit; the process is killed', async () => {
      const scratch = join(d.root, 'scratch-background');
      mkdirSync(scratch);
      const marker = `sleep ${400 + (process.pid % 97)}`; // a command line no other process has
      const run = await restore(['drill', ...d.restoreArgs(HOST), '--point', String(point1), '--disk', ext4,
        '--check', `(${marker} &); echo checked {image}`, '--check-timeout', '2s', '--scratch', scratch, '--json']);
      assert.equal(run.code, 0, run.stderr);
      const result = JSON.parse(run.stdout);
      assert.equal(result.passed, true);
      assert.equal(result.disks[0].exitCode, 0);
      assert.equal(result.disks[0].timedOut, false, 'the drill did not wait for the background process');
      assert.match(result.disks[0].output, /^checked .*ext4\.img$/m);
      const left = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' }).split('\n').filter((line) => line.trim() === marker);
      assert.deepEqual(left, [], 'the background process was killed with the check');
      assert.deepEqual(readdirSync(scratch), []);
    });

    it('refuses a check without {image}', async () => {
      const run = await restore(['drill', ...d.restoreArgs(HOST), '--point', String(point1), '--check', 'false']);
      assert.equal(run.code, 2, run.stderr);
    });
  });
});

function findZeroBlock(image: Buffer, exclude: number[]): number {
  const zero = Buffer.alloc(BLOCK);
  for (let i = 0; i * BLOCK < image.length; i++) {
    if (!exclude.includes(i) && image.subarray(i * BLOCK, (i + 1) * BLOCK).equals(zero)) return i;
  }
  throw new Error('the fixture has no zero block');
}
