// The vault key file: a random 256-bit master key wrapped with AES-256-GCM
// under a key derived from the passphrase with scrypt. Format: docs/SPEC.md §6.
import { createCipheriv, createDecipheriv, randomBytes, scryptSync } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { z } from 'zod';
import { TidemarkError } from './errors.js';
import { writeFileDurable } from './fs-util.js';

export const KEY_FILE_FORMAT = 'tidemark-key';
export const KEY_FILE_VERSION = 1;
/** Minimum scrypt work accepted when opening a key file (DESIGN §5). */
export const SCRYPT_MIN = { N: 65536, r: 8, p: 1 };
const SCRYPT_MAX_N = 1 << 22;

const keyFileSchema = z.object({
  format: z.literal(KEY_FILE_FORMAT),
  version: z.literal(KEY_FILE_VERSION),
  kdf: z.object({
    name: z.literal('scrypt'),
    N: z.number().int(),
    r: z.number().int(),
    p: z.number().int(),
    salt: z.string(),
  }),
  cipher: z.literal('aes-256-gcm'),
  nonce: z.string(),
  ciphertext: z.string(),
  tag: z.string(),
  createdAt: z.string(),
});

export type KeyFile = z.infer<typeof keyFileSchema>;

function aad(): Buffer {
  return Buffer.from(`${KEY_FILE_FORMAT} v${KEY_FILE_VERSION}`);
}

function deriveWrappingKey(passphrase: string, kdf: KeyFile['kdf']): Buffer {
  const { N, r, p } = kdf;
  // scrypt needs 128 * N * r bytes; Node's default maxmem (32 MiB) is too small for N = 2^16.
  return scryptSync(passphrase.normalize('NFC'), Buffer.from(kdf.salt, 'base64'), 32, { N, r, p, maxmem: 256 * N * r + 1024 * 1024 });
}

export function createKeyFile(path: string, passphrase: string): Buffer {
  if (existsSync(path)) throw new TidemarkError('E_KEY_FILE', `key file ${path} already exists; refusing to overwrite it`);
  checkPassphrase(passphrase);
  const master = randomBytes(32);
  const kdf = { name: 'scrypt' as const, ...SCRYPT_MIN, salt: randomBytes(16).toString('base64') };
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', deriveWrappingKey(passphrase, kdf), nonce);
  cipher.setAAD(aad());
  const ciphertext = Buffer.concat([cipher.update(master), cipher.final()]);
  const file: KeyFile = {
    format: KEY_FILE_FORMAT,
    version: KEY_FILE_VERSION,
    kdf,
    cipher: 'aes-256-gcm',
    nonce: nonce.toString('base64'),
    ciphertext: ciphertext.toString('base64'),
    tag: cipher.getAuthTag().toString('base64'),
    createdAt: new Date().toISOString(),
  };
  writeFileDurable(path, JSON.stringify(file, null, 2) + '\n', 0o600);
  return master;
}

export function openKeyFile(path: string, passphrase: string): Buffer {
  const file = readKeyFile(path);
  const decipher = createDecipheriv('aes-256-gcm', deriveWrappingKey(passphrase, file.kdf), Buffer.from(file.nonce, 'base64'));
  decipher.setAAD(aad());
  decipher.setAuthTag(Buffer.from(file.tag, 'base64'));
  try {
    return Buffer.concat([decipher.update(Buffer.from(file.ciphertext, 'base64')), decipher.final()]);
  } catch {
    throw new TidemarkError('E_PASSPHRASE', `wrong passphrase for key file ${path}: set TIDEMARK_PASSPHRASE or --passphrase-file to the passphrase the key was created with`);
  }
}

/** Reads and checks a key file without the passphrase: format, version, safe scrypt parameters (E_KEY_FILE). */
export function readKeyFile(path: string): KeyFile {
  let raw: string;
  try {
    raw = readFileSync(path, 'utf8');
  } catch (err) {
    throw new TidemarkError('E_KEY_FILE', `cannot read key file ${path}: ${(err as Error).message}; pass the vault's key file with --key-file`);
  }
  let file: KeyFile;
  try {
    file = keyFileSchema.parse(JSON.parse(raw));
  } catch {
    throw new TidemarkError('E_KEY_FILE', `${path} is not a Tidemark key file (format ${KEY_FILE_FORMAT} v${KEY_FILE_VERSION}); restore it from your key backup`);
  }
  const { N, r, p } = file.kdf;
  const powerOfTwo = (N & (N - 1)) === 0;
  if (!powerOfTwo || N < SCRYPT_MIN.N || N > SCRYPT_MAX_N || r < SCRYPT_MIN.r || r > 32 || p < 1 || p > 16) {
    throw new TidemarkError('E_KEY_FILE', `key file ${path} has unsafe or invalid scrypt parameters (N=${N}, r=${r}, p=${p}); restore it from your key backup`);
  }
  return file;
}

function checkPassphrase(passphrase: string): void {
  if (passphrase.length < 8) throw new TidemarkError('E_USAGE', 'passphrase too short: use at least 8 characters');
}
