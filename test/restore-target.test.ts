// What a restore does with its local target (--to, a drill's --scratch) when it
// cannot be written: one line naming the path and the fix, exit 12 (a full disk:
// 11); it never hangs. Targets that need root (read-only mounts and devices, a
// full filesystem) are in native-tests/restore-target.test.ts.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
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

describe('restore targets that cannot be written', () => {
  let d: Deployment;
  let disk: string;
  let pointId: number;
  const env = () => ({ TIDEMARK_TOKEN: d.restoreToken });
  const restore = (args: string[]) => collectGuarded(spawnCli('restore', args, env()));

  before(async () => {
    d = await Deployment.start();
    await d.enroll(HOST);
    disk = join(d.root, 'kappa.img');
    await writeMixedImage(disk, 4 * MiB, 31);
    pointId = (await d.syncOnce(HOST, [disk])).pointId;
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
});
