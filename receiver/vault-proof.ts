// Vault proofs (docs/SPEC.md §6.2, §10). A client names a vault by its public
// id and shows that it holds the vault's key with VaultKeys.vaultProof, an
// HKDF derivative of the master key. The receiver keeps only SHA-256 of the
// proof (table `vault`), recorded by the vault's first enrollment, and compares
// every later `enroll` and every `hello` with it: a vault id alone, which is
// public, opens nothing.
import { createHash, timingSafeEqual } from 'node:crypto';
import { TidemarkError } from '../shared/errors.js';
import type { Catalog } from './catalog.js';

export function proofHash(proof: Buffer): Buffer {
  return createHash('sha256').update(proof).digest();
}

/**
 * `record`: a vault without a recorded proof gets this one (its first enrollment; or the
 * first `hello` of an agent of a vault enrolled before proofs were recorded — the host is
 * bound to the vault by its credential). `check`: a vault without a recorded proof is refused.
 * Either way a recorded proof must match.
 */
export function checkVaultProof(catalog: Catalog, vaultId: string, proof: Buffer, mode: 'record' | 'check'): void {
  const db = catalog.db;
  const hash = proofHash(proof);
  const recorded = () => (db.prepare(`SELECT proof_hash FROM vault WHERE vault_id = ?`).pluck().get(vaultId) as Buffer | undefined);
  // The common case reads only: no write lock per hello.
  let stored = recorded();
  if (!stored && mode === 'record') {
    stored = db.transaction(() => {
      db.prepare(`INSERT OR IGNORE INTO vault (vault_id, proof_hash, created_ms) VALUES (?, ?, ?)`).run(vaultId, hash, Date.now());
      return recorded();
    }).immediate();
  }
  if (stored) {
    if (!timingSafeEqual(stored, hash)) {
      throw new TidemarkError('E_FORBIDDEN', `this key file does not belong to vault ${vaultId}: its key proof differs from the one recorded when the vault was first enrolled; use the vault's key file`);
    }
    return;
  }
  const hasHosts = db.prepare(`SELECT 1 FROM host WHERE vault_id = ? LIMIT 1`).get(vaultId) !== undefined;
  if (!hasHosts) throw new TidemarkError('E_NOT_FOUND', `this receiver holds no vault ${vaultId}: no host was enrolled with this key file`);
  throw new TidemarkError('E_FORBIDDEN', `vault ${vaultId} has no key proof on record yet (enrolled by an older version): run one sync of one of its hosts, then retry`);
}

/** Enrollment with the vault proof: recording or checking the proof and creating the host is one transaction. */
export function enrollWithProof(catalog: Catalog, tokenHash: Buffer, host: string, vaultId: string, proof: Buffer): { hostId: number; credential: string } {
  return catalog.db.transaction(() => {
    checkVaultProof(catalog, vaultId, proof, 'record');
    return catalog.enrollHost(tokenHash, host, vaultId);
  }).immediate();
}
