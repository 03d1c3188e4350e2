// Vault proofs in the catalog (receiver/vault-proof.ts): recorded at a vault's
// first enrollment, checked at every later enroll and hello; only a hash is kept.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VaultKeys } from '../../shared/chunk-crypto.js';
import { TidemarkError } from '../../shared/errors.js';
import { Catalog, hashSecret } from '../../receiver/catalog.js';
import { checkVaultProof, enrollWithProof, proofHash } from '../../receiver/vault-proof.js';

const code = (c: string, message?: RegExp) => (err: unknown) => err instanceof TidemarkError && err.code === c && (!message || message.test(err.message));

describe('vault proof', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tidemark-proof-'));
  const catalog = Catalog.open(join(dir, 'catalog.db'));
  after(() => {
    catalog.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const vault = VaultKeys.fromMaster(randomBytes(32));
  const other = VaultKeys.fromMaster(randomBytes(32));

  it('is a 32-byte derivative of the master, distinct per vault and from every other key', () => {
    assert.equal(vault.vaultProof.length, 32);
    assert.deepEqual(VaultKeys.fromMaster(Buffer.alloc(32, 1)).vaultProof, VaultKeys.fromMaster(Buffer.alloc(32, 1)).vaultProof);
    assert.notDeepEqual(vault.vaultProof, other.vaultProof);
    for (const key of [vault.idKey, vault.encRoot]) assert.notDeepEqual(vault.vaultProof, key);
  });

  it('the first enrollment records it; a later one must match, and a refused one uses no token', () => {
    const t1 = catalog.createToken('enroll');
    enrollWithProof(catalog, hashSecret(t1), 'h1', vault.vaultId, vault.vaultProof);
    const row = catalog.db.prepare(`SELECT proof_hash FROM vault WHERE vault_id = ?`).get(vault.vaultId) as { proof_hash: Buffer };
    assert.deepEqual(row.proof_hash, proofHash(vault.vaultProof));

    const t2 = catalog.createToken('enroll');
    assert.throws(() => enrollWithProof(catalog, hashSecret(t2), 'h2', vault.vaultId, other.vaultProof), code('E_FORBIDDEN', /does not belong to vault/));
    assert.equal(catalog.db.prepare(`SELECT used_ms FROM token WHERE hash = ?`).pluck().get(hashSecret(t2)), null);
    assert.equal(catalog.db.prepare(`SELECT 1 FROM host WHERE name = 'h2'`).get(), undefined);
    enrollWithProof(catalog, hashSecret(t2), 'h2', vault.vaultId, vault.vaultProof);
    // A failed enrollment (name taken) records no proof for a new vault.
    const t3 = catalog.createToken('enroll');
    assert.throws(() => enrollWithProof(catalog, hashSecret(t3), 'h1', other.vaultId, other.vaultProof), code('E_CONFLICT'));
    assert.equal(catalog.db.prepare(`SELECT 1 FROM vault WHERE vault_id = ?`).get(other.vaultId), undefined);
  });

  it('hello: matches pass, others are refused; an unknown vault is not found', () => {
    checkVaultProof(catalog, vault.vaultId, vault.vaultProof, 'check');
    checkVaultProof(catalog, vault.vaultId, vault.vaultProof, 'record');
    assert.throws(() => checkVaultProof(catalog, vault.vaultId, randomBytes(32), 'check'), code('E_FORBIDDEN'));
    assert.throws(() => checkVaultProof(catalog, vault.vaultId, other.vaultProof, 'record'), code('E_FORBIDDEN'));
    assert.throws(() => checkVaultProof(catalog, other.vaultId, other.vaultProof, 'check'), code('E_NOT_FOUND', /holds no vault/));
  });

  it('a vault enrolled before proofs existed: an agent hello records it, restore waits for that', () => {
    const legacy = VaultKeys.fromMaster(randomBytes(32));
    catalog.enrollHost(hashSecret(catalog.createToken('enroll')), 'legacy-host', legacy.vaultId); // no proof, as before
    assert.throws(() => checkVaultProof(catalog, legacy.vaultId, legacy.vaultProof, 'check'), code('E_FORBIDDEN', /no key proof on record/));
    checkVaultProof(catalog, legacy.vaultId, legacy.vaultProof, 'record');
    checkVaultProof(catalog, legacy.vaultId, legacy.vaultProof, 'check');
    assert.throws(() => checkVaultProof(catalog, legacy.vaultId, other.vaultProof, 'check'), code('E_FORBIDDEN'));
  });
});
