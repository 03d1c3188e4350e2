// What a restore does with its local target (--to, a drill's --scratch) when it
// cannot be written: one line naming the path and the fix, exit 12 (a full disk:
// 11); it never hangs. Targets that need root (read-only mounts and devices, a
// full filesystem) are in native-tests/restore-target.test.ts. And what it does
// beside another run: it never writes into another run's partial file nor
// replaces a --to that appeared meanwhile; interrupted, it leaves no partial file.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync, watch, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Deployment, PASSPHRASE, collectGuarded, launcherNodeFlags, launcherPath, spawnCli, type CliResult } from './harness.js';
import { writeMixedImage } from './fixtures.js';

const MiB = 1024 * 1024;
const HOST = 'kappa';
function oneLine(result: CliResult): string {
  assert.notEqual(result.signal, 'SIGKILL', 'the command hung');
  const lines = result.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `expected a one-line error, got:\n${result.stderr}`);
  return lines[0]!;
}

/** Stops `child` (SIGSTOP) as soon as `path` exists (and has `size` bytes, if given); fails if the child exits first. */
function stopWhenCreated(child: ChildProcess, path: string, size?: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const watcher = watch(dirname(path), () => check());
    const onExit = () => {
      watcher.close();
      reject(new Error(`the command exited before ${path} appeared`));
    };
    const check = () => {
      if (!existsSync(path) || (size !== undefined && statSync(path).size !== size)) return;
      child.kill('SIGSTOP');
      watcher.close();
      child.off('exit', onExit);
      resolve();
    };
    child.once('exit', onExit);
    check();
  });
}

describe('restore targets that cannot be written', () => {
  let d: Deployment;
  let disk: string;
  let big: string;
  let pointId: number;
  let newerPointId: number;
  const env = () => ({ TIDEMARK_TOKEN: d.restoreToken });
  const restore = (args: string[]) => collectGuarded(spawnCli('restore', args, env()));

  before(async () => {
    d = await Deployment.start();
    await d.enroll(HOST);
    disk = join(d.root, 'kappa.img');
    big = join(d.root, 'kappa-big.img');
    await writeMixedImage(disk, 4 * MiB, 31);
    await writeMixedImage(big, 64 * MiB, 32); // long enough a restore to stop it halfway
    pointId = (await d.syncOnce(HOST, [disk, big])).pointId;
    newerPointId = (await d.syncOnce(HOST, [disk])).pointId; // a cycle run with fewer --disk: no `big`
  });
  after(() => d?.close());

  const diskArgs = (to: string) => ['disk', ...d.restoreArgs(HOST), '--disk', disk, '--point', String(pointId), '--to', to];
  const exportArgs = (to: string) => ['export', ...d.restoreArgs(HOST), '--point', String(pointId), '--to', to];

  it('a --to in a missing directory or under a file: exit 12 naming the path, disk and export alike', async () => {
    const file = join(d.root, 'a-file');
    writeFileSync(file, 'not a directory');
    const cases = [
      { to: join(d.root, 'missing-dir', 'x'), says: /directory does not exist; create it or choose another --to$/ },
      { to: join(file, 'x'), says: /is a file, not a directory; choose another --to$/ },
    ];
    for (const { to, says } of cases) {
      for (const args of [diskArgs(`${to}.img`), exportArgs(`${to}.tar`)]) {
        const run = await restore(args);
        const line = oneLine(run);
        assert.equal(run.code, 12, `${args[0]} --to ${args.at(-1)}: ${run.stderr}`);
        assert.ok(line.includes(args.at(-1)!), `names the path: ${line}`);
        assert.match(line, says);
      }
    }
  });

  it('a file size limit (ulimit -f) below the image: exit 12 naming the limit', async () => {
    const to = join(d.root, 'limited.img');
    const launcher = [process.execPath, ...launcherNodeFlags('restore'), launcherPath('restore')];
    const child = spawn('/bin/sh', ['-c', 'ulimit -f 1024 && exec "$@"', 'sh', ...launcher, ...diskArgs(to)], {
      env: { ...process.env, TIDEMARK_PASSPHRASE: PASSPHRASE, TIDEMARK_LOG_LEVEL: 'warn', ...env() },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const run = await collectGuarded(child);
    assert.equal(run.code, 12, run.stderr);
    assert.match(oneLine(run), /cannot write .*limited\.img\.partial: file too large .*ulimit -f/);
    assert.equal(existsSync(`${to}.partial`), false);
    assert.equal(existsSync(to), false);
  });

  it('a drill whose --scratch is a file: exit 12 naming it', async () => {
    const file = join(d.root, 'scratch-file');
    writeFileSync(file, 'not a directory');
    const run = await restore(['drill', ...d.restoreArgs(HOST), '--point', String(pointId), '--check', 'true {image}', '--scratch', file]);
    assert.equal(run.code, 12, run.stderr);
    assert.match(oneLine(run), new RegExp(`cannot write ${file}: .* choose another --scratch$`));
    assert.deepEqual(readdirSync(d.root).filter((name) => name.startsWith('tidemark-drill-')), []);
  });

  it('a partial file of another run: disk and export refuse with exit 10 naming it, and leave it alone', async () => {
    for (const [to, args] of [[join(d.root, 'busy.img'), diskArgs], [join(d.root, 'busy.tar'), exportArgs]] as const) {
      writeFileSync(`${to}.partial`, 'another run writes here');
      const run = await restore(args(to));
      assert.equal(run.code, 10, run.stderr);
      assert.equal(oneLine(run), `tidemark-restore: ${to}.partial exists: another restore to ${to} is running, or one was interrupted; ` +
        `if none is running, remove ${to}.partial and retry`);
      assert.equal(readFileSync(`${to}.partial`, 'utf8'), 'another run writes here');
      assert.equal(existsSync(to), false);
    }
  });

  it('a --to that appears while the restore runs is not replaced: exit 10, and no partial file left', async () => {
    const to = join(d.root, 'appeared.img');
    const child = spawnCli('restore', ['disk', ...d.restoreArgs(HOST), '--disk', big, '--point', String(pointId), '--to', to], env());
    const result = collectGuarded(child);
    await stopWhenCreated(child, `${to}.partial`);
    writeFileSync(to, 'another run finished first');
    child.kill('SIGCONT');
    const run = await result;
    assert.equal(run.code, 10, run.stderr);
    assert.match(oneLine(run), new RegExp(`${to} appeared while this restore ran .* remove it or choose another --to$`));
    assert.equal(readFileSync(to, 'utf8'), 'another run finished first');
    assert.equal(existsSync(`${to}.partial`), false);
  });

  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    it(`${signal} during a disk restore removes its partial file`, async () => {
      const to = join(d.root, `interrupted-${signal}.img`);
      const child = spawnCli('restore', ['disk', ...d.restoreArgs(HOST), '--disk', big, '--point', String(pointId), '--to', to], env());
      const result = collectGuarded(child);
      await stopWhenCreated(child, `${to}.partial`, 64 * MiB); // sized: the restore is under way
      child.kill(signal); // delivered once it runs again
      child.kill('SIGCONT');
      const run = await result;
      assert.equal(run.signal, signal, `ended by ${signal}: ${run.stderr}`);
      assert.equal(existsSync(`${to}.partial`), false, 'partial file removed');
      assert.equal(existsSync(to), false);
    });
  }

  it('--at picks, for disk, the newest point at or before it that has the disk', async () => {
    const to = join(d.root, 'at-big.img');
    const run = await restore(['disk', ...d.restoreArgs(HOST), '--disk', big, '--at', new Date().toISOString(), '--to', to, '--json']);
    assert.equal(run.code, 0, run.stderr);
    assert.ok(newerPointId > pointId);
    assert.equal(JSON.parse(run.stdout).point, pointId, `point ${newerPointId} has no ${big}`);
  });

  it('--at that is not ISO-8601 and --point that is not an id are usage errors (exit 2)', async () => {
    const to = join(d.root, 'never.img');
    for (const choice of [['--at', '1'], ['--at', 'yesterday'], ['--at', '2026-13-45'], ['--at', '2026-02-30T10:00:00Z'], ['--point', 'abc'], ['--point', '1.5']]) {
      for (const mode of ['disk', 'export', 'drill']) {
        const args = mode === 'disk' ? ['--disk', disk, '--to', to] : mode === 'export' ? ['--to', to] : ['--check', 'true {image}'];
        const run = await restore([mode, ...d.restoreArgs(HOST), ...choice, ...args]);
        assert.equal(run.code, 2, `${mode} ${choice.join(' ')}: ${run.stderr}`);
        assert.match(oneLine(run), new RegExp(`^tidemark-restore: invalid ${choice[0]} "${choice[1]}": use `));
      }
    }
    assert.equal(existsSync(to), false);
  });
});
