// Enrollment: create or open the vault key file, trade the one-time token for
// this host's own credential, and record both in the state directory.
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { hostname } from 'node:os';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { ReceiverConnection, normalizeFingerprint } from '../shared/connection.js';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
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

/**
 * A failed enrollment (receiver unreachable, token or key refused, wrong fingerprint) leaves the
 * state directory and key file as they were: what it created is removed, so the next attempt
 * starts clean instead of meeting a half-made state or a key file of a vault nobody enrolled.
 */
export async function enroll(opts: EnrollOptions): Promise<{ host: string; vaultId: string; keyCreated: boolean }> {
  const keyFile = resolve(opts.keyFile);
  const undo = undoCreated(opts.stateDir, keyFile);
  const progress = { accepted: false };
  try {
    return await enrollState(opts, keyFile, progress);
  } catch (err) {
    // Once the receiver accepted, it recorded this key's vault: the key file must stay.
    undo(progress.accepted);
    throw err;
  }
}

async function enrollState(opts: EnrollOptions, keyFile: string, progress: { accepted: boolean }): Promise<{ host: string; vaultId: string; keyCreated: boolean }> {
  const state = AgentState.open(opts.stateDir, { mustBeEnrolled: false });
  try {
    const existing = state.enrollment();
    if (existing) throw new TidemarkError('E_CONFLICT', `${opts.stateDir} is already enrolled as host ${existing.host} with ${existing.receiverUrl}; use another --state directory`);
    const keyCreated = !existsSync(keyFile);
    const master = keyCreated ? createKeyFile(keyFile, opts.passphrase) : openKeyFile(keyFile, opts.passphrase);
    const keys = VaultKeys.fromMaster(master);
    const host = opts.host ?? hostname();
    const conn = await ReceiverConnection.open({ url: opts.receiverUrl, fingerprint: opts.fingerprint, path: ENROLL_PATH, authorization: `Token ${opts.token}` });
    try {
      const { credential } = await conn.request('enroll', { host, vaultId: keys.vaultId, vaultProof: keys.vaultProof });
      progress.accepted = true;
      try {
        state.saveEnrollment({ receiverUrl: opts.receiverUrl, fingerprint: normalizeFingerprint(opts.fingerprint), host, keyFile, vaultId: keys.vaultId }, credential);
      } catch (err) {
        // The token is spent and the name taken: a plain retry would be refused.
        const cause = asTidemarkError(err, { stateDir: opts.stateDir });
        throw new TidemarkError(cause.code, `the receiver enrolled host ${host}, but its credential could not be saved in ${opts.stateDir} (${cause.message}); ` +
          `fix that, then enroll again with a token from tidemark-receiver token --host ${host}`, { cause: err, retryable: false });
      }
    } finally {
      conn.close();
    }
    return { host, vaultId: keys.vaultId, keyCreated };
  } finally {
    state.close();
  }
}

/**
 * Notes what exists now; the function returned removes what was created since: the state
 * directory (and parents) if it did not exist, else the entries added to it, and the key file
 * unless `keepKey`. SQLite's -wal/-shm of a state.db that existed are its data: kept.
 */
function undoCreated(stateDir: string, keyFile: string): (keepKey: boolean) => void {
  const newDir = firstMissing(resolve(stateDir));
  const entries = newDir === undefined ? new Set(readdirSync(stateDir)) : new Set<string>();
  const hadDb = entries.has('state.db');
  const keyExisted = existsSync(keyFile);
  return (keepKey) => {
    if (newDir !== undefined) rmSync(newDir, { recursive: true, force: true });
    else {
      for (const name of readdirSync(stateDir)) {
        if (entries.has(name) || (hadDb && name.startsWith('state.db-'))) continue;
        rmSync(join(stateDir, name), { recursive: true, force: true });
      }
    }
    if (!keyExisted && !keepKey) rmSync(keyFile, { force: true });
  };
}

/** The outermost directory of `path` that does not exist yet (mkdir -p would create it), or undefined. */
function firstMissing(path: string): string | undefined {
  let missing: string | undefined;
  for (let p = path; !existsSync(p); p = dirname(p)) missing = p;
  return missing;
}

export const KEY_BACKUP_WARNING = (keyFile: string) =>
  `\n*** A new vault key was created at ${keyFile}. ***\n` +
  `Every recovery point of this vault is encrypted with it. If the key file or its passphrase is lost,\n` +
  `the data is lost: the receiver cannot decrypt it. Back it up now, away from this host, e.g.:\n` +
  `    cp ${keyFile} /secure/offsite/location/   (and store the passphrase in your password manager)\n` +
  `Other hosts enrolled with a copy of this key file share deduplicated storage (one vault).\n\n`;
