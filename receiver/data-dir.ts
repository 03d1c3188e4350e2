// The receiver's data directory: identity (TLS key and certificate), catalog, packs.
//
//   DIR/receiver.json      format marker and creation time
//   DIR/tls/key.pem        private key (0600), made at init
//   DIR/tls/cert.pem       self-signed certificate; clients pin its SHA-256 fingerprint
//   DIR/catalog.db         SQLite catalog (WAL)
//   DIR/packs/VAULT/*.pack append-only pack files
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { X509Certificate } from 'node:crypto';
import { join } from 'node:path';
import { generate } from 'selfsigned';
import { TidemarkError } from '../shared/errors.js';
import { writeFileDurable } from '../shared/fs-util.js';
import { Catalog } from './catalog.js';

const MARKER = 'receiver.json';

export interface DataDir {
  root: string;
  keyPem: string;
  certPem: string;
  fingerprint: string;
  packDir: string;
  catalogPath: string;
}

function paths(root: string) {
  return {
    marker: join(root, MARKER),
    key: join(root, 'tls', 'key.pem'),
    cert: join(root, 'tls', 'cert.pem'),
    catalog: join(root, 'catalog.db'),
    packs: join(root, 'packs'),
  };
}

export function fingerprintOf(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256;
}

export async function initDataDir(root: string): Promise<DataDir> {
  const p = paths(root);
  if (existsSync(p.marker)) {
    const fingerprint = fingerprintOf(readFileSync(p.cert, 'utf8'));
    throw new TidemarkError('E_CONFLICT', `${root} is already a receiver data directory (fingerprint ${fingerprint}); nothing was changed`);
  }
  mkdirSync(join(root, 'tls'), { recursive: true, mode: 0o700 });
  mkdirSync(p.packs, { recursive: true, mode: 0o700 });
  const pems = await generate([{ name: 'commonName', value: 'tidemark-receiver' }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    notAfterDate: new Date(Date.now() + 10 * 365 * 86_400_000),
    extensions: [{ name: 'basicConstraints', cA: false }],
  });
  writeFileDurable(p.key, pems.private, 0o600);
  writeFileDurable(p.cert, pems.cert, 0o644);
  Catalog.open(p.catalog).close();
  writeFileDurable(p.marker, JSON.stringify({ format: 'tidemark-receiver', version: 1, createdAt: new Date().toISOString() }) + '\n');
  return openDataDir(root);
}

export function openDataDir(root: string): DataDir {
  const p = paths(root);
  if (!existsSync(p.marker)) {
    throw new TidemarkError('E_USAGE', `${root} is not a receiver data directory; create it with tidemark-receiver init --data ${root}`);
  }
  const certPem = readFileSync(p.cert, 'utf8');
  return { root, keyPem: readFileSync(p.key, 'utf8'), certPem, fingerprint: fingerprintOf(certPem), packDir: p.packs, catalogPath: p.catalog };
}
