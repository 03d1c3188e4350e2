// The shipped systemd units, taken at their word: the receiver unit's
// ExecStart is run as written (through `env node`, with its node flags, via a
// symlinked bin as `npm install -g` makes one), against a scratch data dir.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { SERVE_NODE_FLAGS } from '../receiver/node-flags.js';
import { REPO_ROOT, runJson, tempDir } from './harness.js';

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
    assert.deepEqual(command.slice(0, 2 + SERVE_NODE_FLAGS.length), ['/usr/bin/env', 'node', ...SERVE_NODE_FLAGS]);
    assert.deepEqual(command.slice(2 + SERVE_NODE_FLAGS.length, 4 + SERVE_NODE_FLAGS.length), ['/usr/local/bin/tidemark-receiver', 'serve']);

    // The unit's command line, with the installed bin and its options pointed at scratch places.
    const bin = join(dir, 'bin', 'tidemark-receiver');
    mkdirSync(join(dir, 'bin'));
    symlinkSync(join(REPO_ROOT, 'bin', 'tidemark-receiver.js'), bin);
    const data = join(dir, 'data');
    await runJson('receiver', ['init', '--data', data]);
    const args = command.slice(1).map((a) => (a === '/usr/local/bin/tidemark-receiver' ? bin : a));
    args.splice(args.indexOf('--data') + 1, 1, data);
    args.splice(args.indexOf('--listen') + 1, 1, '127.0.0.1:0');
    const serve = spawn(command[0]!, args, { env: { ...process.env, TIDEMARK_LOG_LEVEL: 'info' }, stdio: ['ignore', 'ignore', 'pipe'] });
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
      for (const flag of SERVE_NODE_FLAGS) assert.ok(cmdline.includes(flag), `node runs with ${flag}: ${cmdline.join(' ')}`);
    } finally {
      serve.kill('SIGTERM');
      if (serve.exitCode === null) await new Promise((resolve) => serve.once('exit', resolve));
    }
  });
});
