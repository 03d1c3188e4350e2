import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TidemarkError } from '../../shared/errors.js';
import { createKeyFile, openKeyFile } from '../../shared/keyfile.js';

describe('key file', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tidemark-key-'));
  const path = join(dir, 'vault.key');

  it('wraps a random master key that only the passphrase opens', () => {
    const master = createKeyFile(path, 'a long passphrase');
    assert.equal(master.length, 32);
    assert.equal(statSync(path).mode & 0o777, 0o600);
    assert.deepEqual(openKeyFile(path, 'a long passphrase'), master);
    assert.ok(!readFileSync(path, 'utf8').includes(master.toString('base64')));
    assert.throws(() => openKeyFile(path, 'a wrong passphrase'), (e: unknown) => e instanceof TidemarkError && e.code === 'E_PASSPHRASE' && e.exitCode === 3);
  });

  it('stores its scrypt parameters and refuses weakened ones', () => {
    const file = JSON.parse(readFileSync(path, 'utf8'));
    assert.deepEqual({ N: file.kdf.N, r: file.kdf.r, p: file.kdf.p }, { N: 65536, r: 8, p: 1 });
    const weak = join(dir, 'weak.key');
    writeFileSync(weak, JSON.stringify({ ...file, kdf: { ...file.kdf, N: 1024 } }));
    assert.throws(() => openKeyFile(weak, 'a long passphrase'), /unsafe or invalid scrypt parameters/);
  });

  it('never overwrites an existing key file, and names garbage as such', () => {
    assert.throws(() => createKeyFile(path, 'another passphrase'), /already exists/);
    const garbage = join(dir, 'garbage.key');
    writeFileSync(garbage, 'not json');
    assert.throws(() => openKeyFile(garbage, 'x'), /not a Tidemark key file/);
    rmSync(dir, { recursive: true, force: true });
  });
});
