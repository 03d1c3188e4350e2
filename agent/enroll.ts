// Enrollment: create or open the vault key file, trade the one-time token for
// this host's own credential, and record both in the state directory.
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { hostname } from 'node:os';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { ReceiverConnection, normalizeFingerprint } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { createKeyFile, openKeyFile } from '../shared/keyfile.js';
import { ENROLL_PATH } from '../shared/protocol.js';
import { AgentState } from './state.js';

export interface EnrollOptions {
  stateDir: string;
  receiverUrl: string;
  fingerprint: string;
  token: string;
  keyFile: string;
  host?: string;
  passphrase: string;
}

export async function enroll(opts: EnrollOptions): Promise<{ host: string; vaultId: string; keyCreated: boolean }> {
  const state = AgentState.open(opts.stateDir, { mustBeEnrolled: false });
  try {
    const existing = state.enrollment();
    if (existing) throw new TidemarkError('E_CONFLICT', `${opts.stateDir} is already enrolled as host ${existing.host} with ${existing.receiverUrl}; use another --state directory`);
    const keyFile = resolve(opts.keyFile);
    const keyCreated = !existsSync(keyFile);
    const master = keyCreated ? createKeyFile(keyFile, opts.passphrase) : openKeyFile(keyFile, opts.passphrase);
    const keys = VaultKeys.fromMaster(master);
    const host = opts.host ?? hostname();
    const conn = await ReceiverConnection.open({ url: opts.receiverUrl, fingerprint: opts.fingerprint, path: ENROLL_PATH, authorization: `Token ${opts.token}` });
    try {
      const { credential } = await conn.request('enroll', { host, vaultId: keys.vaultId, vaultProof: keys.vaultProof });
      state.saveEnrollment({ receiverUrl: opts.receiverUrl, fingerprint: normalizeFingerprint(opts.fingerprint), host, keyFile, vaultId: keys.vaultId }, credential);
    } finally {
      conn.close();
    }
    return { host, vaultId: keys.vaultId, keyCreated };
  } finally {
    state.close();
  }
}

export const KEY_BACKUP_WARNING = (keyFile: string) =>
  `\n*** A new vault key was created at ${keyFile}. ***\n` +
  `Every recovery point of this vault is encrypted with it. If the key file or its passphrase is lost,\n` +
  `the data is lost: the receiver cannot decrypt it. Back it up now, away from this host, e.g.:\n` +
  `    cp ${keyFile} /secure/offsite/location/   (and store the passphrase in your password manager)\n` +
  `Other hosts enrolled with a copy of this key file share deduplicated storage (one vault).\n\n`;
