// writeFileDurable writes secrets (key file, credential, TLS key) as root: whatever is found
// at its temp file's name must neither keep its mode nor be written through.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileDurable } from '../../shared/fs-util.js';
import { tempDir } from '../harness.js';

describe('writeFileDurable', () => {
  it('ignores a file or symlink planted at its temp name', () => {
    const dir = tempDir();
    try {
      const path = join(dir, 'vault.key');
      const victim = join(dir, 'victim');
      writeFileSync(victim, 'untouched');
      symlinkSync(victim, `${path}.tmp-${process.pid}`);
      writeFileDurable(path, 'secret one', 0o600);
      assert.equal(readFileSync(victim, 'utf8'), 'untouched', 'not written through the symlink');
      assert.equal(readFileSync(path, 'utf8'), 'secret one');

      writeFileSync(`${path}.tmp-${process.pid}`, 'planted');
      chmodSync(`${path}.tmp-${process.pid}`, 0o644);
      writeFileDurable(path, 'secret two', 0o600);
      assert.equal(readFileSync(path, 'utf8'), 'secret two');
      assert.equal(statSync(path).mode & 0o777, 0o600, 'the secret has its own mode, not the planted file\'s');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
