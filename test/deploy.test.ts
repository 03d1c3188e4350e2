// The shipped systemd units and launchers, taken at their word: the receiver
// unit's ExecStart is run as written (the bin symlinked as `npm install -g`
// makes one, its shebang giving node its flags), against a scratch data dir.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT, collect, launcherNodeFlags, launcherPath, runJson, tempDir, type Tool } from './harness.js';

function execStart(unit: string): string[] {
  const line = readFileSync(join(REPO_ROOT, 'deploy', 'systemd', unit), 'utf8').split('\n').find((l) => l.startsWith('ExecStart='));
  assert.ok(line, `${unit} has an ExecStart line`);
  return line.slice('ExecStart='.length).trim().split(/\s+/);
}

describe('systemd units', () => {
  const dir = tempDir('tidemark-deploy-');
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('the receiver unit starts serve with the node flags serve is measured with, and it listens', async () => {
    const command = execStart('tidemark-receiver.service');
    assert.deepEqual(command.slice(0, 2), ['/usr/local/bin/tidemark-receiver', 'serve']);
    const flags = launcherNodeFlags('receiver');
    assert.ok(flags.includes('--initial-old-space-size=128'), `the launcher's shebang gives node its flags: ${flags.join(' ')}`);

    // The unit's command line, with the installed bin and its options pointed at scratch places.
    const bin = join(dir, 'bin', 'tidemark-receiver');
    mkdirSync(join(dir, 'bin'));
    symlinkSync(launcherPath('receiver'), bin);
    const data = join(dir, 'data');
    await runJson('receiver', ['init', '--data', data]);
    const args = command.slice(1);
    args.splice(args.indexOf('--data') + 1, 1, data);
    args.splice(args.indexOf('--listen') + 1, 1, '127.0.0.1:0');
    const serve = spawn(bin, args, { env: { ...process.env, TIDEMARK_LOG_LEVEL: 'info' }, stdio: ['ignore', 'ignore', 'pipe'] });
    try {
      const listening = await new Promise<boolean>((resolve) => {
        let log = '';
        serve.stderr!.on('data', (d: Buffer) => {
          log += d.toString();
          if (log.includes('"msg":"listening"')) resolve(true);
        });
        serve.once('exit', () => resolve(false));
      });
      assert.ok(listening, 'serve started by the unit command line is listening');
      const cmdline = readFileSync(`/proc/${serve.pid}/cmdline`, 'utf8').split('\0');
      for (const flag of flags) assert.ok(cmdline.includes(flag), `node runs with ${flag}: ${cmdline.join(' ')}`);
    } finally {
      serve.kill('SIGTERM');
      if (serve.exitCode === null) await new Promise((resolve) => serve.once('exit', resolve));
    }
  });

  it('every launcher runs when executed directly, through its shebang', async () => {
    for (const tool of ['agent', 'receiver', 'restore'] as Tool[]) {
      const result = await collect(spawn(launcherPath(tool), ['--help'], { stdio: ['ignore', 'pipe', 'pipe'] }));
      assert.equal(result.code, 0, `tidemark-${tool} --help: ${result.stderr}`);
      assert.match(result.stdout, new RegExp(`^Usage: tidemark-${tool} `));
    }
  });
});
