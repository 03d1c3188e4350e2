// DATA/serve.lock (receiver/data-dir.ts): one serve per data directory. A lock whose
// pid now belongs to another process (a serve killed, a host rebooted: pids are reused)
// must not keep serve down, while a lock of a serve still running must.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TidemarkError } from '../../shared/errors.js';
import { acquireServeLock } from '../../receiver/data-dir.js';

const linux = existsSync(`/proc/${process.pid}/stat`);

function startOf(pid: number): string {
  const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return text.slice(text.lastIndexOf(')') + 2).trim().split(' ')[19]!;
}

describe('serve.lock', { skip: !linux && 'needs /proc' }, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tidemark-serve-lock-'));
  const other = spawn('sleep', ['600'], { stdio: 'ignore' });
  after(() => {
    other.kill();
    rmSync(dir, { recursive: true, force: true });
  });
  const lock = join(dir, 'serve.lock');

  it('records the pid and start time of the serve holding it, and removes it on release', () => {
    const release = acquireServeLock(dir);
    assert.equal(readFileSync(lock, 'utf8'), `${process.pid} ${startOf(process.pid)}\n`);
    release();
    assert.equal(existsSync(lock), false);
  });

  it('is taken over when its pid now belongs to another process (pid reused)', () => {
    // A serve that ran with the pid `other` has now, and died: its start time differs.
    writeFileSync(lock, `${other.pid} 1\n`);
    const release = acquireServeLock(dir);
    assert.equal(readFileSync(lock, 'utf8').split(' ')[0], String(process.pid));
    release();
  });

  it('is refused while the process that took it still runs', () => {
    writeFileSync(lock, `${other.pid} ${startOf(other.pid!)}\n`);
    assert.throws(() => acquireServeLock(dir), (err: unknown) =>
      err instanceof TidemarkError && err.code === 'E_CONFLICT' && err.message.includes(`pid ${other.pid}`));
    // A lock written before start times were recorded: the pid alone decides, as before.
    writeFileSync(lock, `${other.pid}\n`);
    assert.throws(() => acquireServeLock(dir), (err: unknown) => err instanceof TidemarkError && err.code === 'E_CONFLICT');
    rmSync(lock);
  });
});
