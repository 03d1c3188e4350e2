// `tidemark-agent key`: where the key file is, what protects it, how to back
// it up; `--check` proves the passphrase opens it (exit 3 when it does not).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { createKeyFile, openKeyFile } from '../shared/keyfile.js';
import { Deployment, PASSPHRASE, runCli } from './harness.js';

describe('tidemark-agent key', () => {
  let d: Deployment;
  let state: string;
  let vaultId: string;
  const noPassphrase = { TIDEMARK_PASSPHRASE: undefined, TIDEMARK_PASSPHRASE_FILE: undefined };

  before(async () => {
    d = await Deployment.start();
    state = await d.enroll('keyed');
    vaultId = VaultKeys.fromMaster(openKeyFile(d.keyFile, PASSPHRASE)).vaultId;
  });
  after(() => d?.close());

  it('shows the file, its scrypt parameters, creation time and backup advice without the passphrase', async () => {
    const r = await runCli('agent', ['key', '--key-file', d.keyFile, '--json'], noPassphrase);
    assert.equal(r.code, 0, r.stderr);
    const doc = JSON.parse(r.stdout);
    const file = JSON.parse(readFileSync(d.keyFile, 'utf8'));
    assert.equal(doc.keyFile, d.keyFile);
    assert.deepEqual(doc.kdf, { name: 'scrypt', N: 65536, r: 8, p: 1 });
    assert.equal(doc.createdAt, file.createdAt);
    assert.equal(doc.mode, '0600');
    assert.deepEqual(doc.warnings, []);
    assert.equal(doc.checked, false);
    assert.equal(doc.vaultId, null, 'the vault id needs the passphrase (or the enrollment)');
    assert.match(doc.backup.join('\n'), /Losing this key file or its passphrase loses every recovery point/);
    assert.match(doc.backup.join('\n'), /--check/);

    const human = await runCli('agent', ['key', '--key-file', d.keyFile], noPassphrase);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /scrypt N=65536 r=8 p=1/);
    assert.match(human.stdout, /Backup:/);
    assert.match(human.stdout, /cp .*vault\.key/);
  });

  it('--check opens it with the passphrase and says OK', async () => {
    const r = await runCli('agent', ['key', '--key-file', d.keyFile, '--check']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`OK: the passphrase opens .*vault\\.key \\(vault ${vaultId}\\)`));
    const json = JSON.parse((await runCli('agent', ['key', '--key-file', d.keyFile, '--check', '--json'])).stdout);
    assert.equal(json.checked, true);
    assert.equal(json.vaultId, vaultId);
    assert.equal(json.vaultIdSource, 'passphrase');
    // A backup copy checks the same way, with a passphrase file.
    const copy = join(d.root, 'backup-copy.key');
    copyFileSync(d.keyFile, copy);
    const passphraseFile = join(d.root, 'passphrase');
    writeFileSync(passphraseFile, `${PASSPHRASE}\n`, { mode: 0o600 });
    const viaFile = await runCli('agent', ['key', '--key-file', copy, '--check', '--passphrase-file', passphraseFile], noPassphrase);
    assert.equal(viaFile.code, 0, viaFile.stderr);
  });

  it('--check with a wrong passphrase exits 3; without any passphrase exits 2', async () => {
    const wrong = await runCli('agent', ['key', '--key-file', d.keyFile, '--check'], { TIDEMARK_PASSPHRASE: 'not the passphrase' });
    assert.equal(wrong.code, 3);
    assert.match(wrong.stderr.trim(), /^tidemark-agent: wrong passphrase for key file/);
    assert.equal(wrong.stdout, '');
    const none = await runCli('agent', ['key', '--key-file', d.keyFile, '--check'], noPassphrase);
    assert.equal(none.code, 2);
  });

  it('--state takes the key file and vault of the enrollment; a key of another vault fails the check', async () => {
    const r = await runCli('agent', ['key', '--state', state, '--json'], noPassphrase);
    assert.equal(r.code, 0, r.stderr);
    const doc = JSON.parse(r.stdout);
    assert.equal(doc.keyFile, d.keyFile);
    assert.equal(doc.host, 'keyed');
    assert.equal(doc.vaultId, vaultId);
    assert.equal(doc.vaultIdSource, 'enrollment');
    const checked = JSON.parse((await runCli('agent', ['key', '--state', state, '--check', '--json'])).stdout);
    assert.equal(checked.vaultIdSource, 'passphrase');

    const other = join(d.root, 'other.key');
    createKeyFile(other, PASSPHRASE);
    const mismatch = await runCli('agent', ['key', '--state', state, '--key-file', other, '--check']);
    assert.equal(mismatch.code, 3);
    assert.match(mismatch.stderr, new RegExp(`belongs to vault [0-9a-f]{32}, not vault ${vaultId} that host keyed was enrolled with`));
  });

  it('warns about a key file others can read, refuses weak scrypt parameters and garbage', async () => {
    const loose = join(d.root, 'loose.key');
    copyFileSync(d.keyFile, loose);
    chmodSync(loose, 0o644);
    const doc = JSON.parse((await runCli('agent', ['key', '--key-file', loose, '--json'], noPassphrase)).stdout);
    assert.equal(doc.mode, '0644');
    assert.match(doc.warnings[0], /readable by other users .*chmod 600/);

    const file = JSON.parse(readFileSync(d.keyFile, 'utf8'));
    const weak = join(d.root, 'weak.key');
    writeFileSync(weak, JSON.stringify({ ...file, kdf: { ...file.kdf, N: 1024 } }), { mode: 0o600 });
    const w = await runCli('agent', ['key', '--key-file', weak], noPassphrase);
    assert.equal(w.code, 3);
    assert.match(w.stderr, /unsafe or invalid scrypt parameters \(N=1024/);

    const garbage = join(d.root, 'garbage.key');
    writeFileSync(garbage, 'not a key');
    assert.equal((await runCli('agent', ['key', '--key-file', garbage], noPassphrase)).code, 3);
    assert.equal((await runCli('agent', ['key', '--key-file', join(d.root, 'missing.key')], noPassphrase)).code, 3);
    assert.equal((await runCli('agent', ['key'], noPassphrase)).code, 2);
  });
});
