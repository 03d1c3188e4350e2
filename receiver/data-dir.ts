// The receiver's data directory: identity (TLS key and certificate), catalog, packs.
//
//   DIR/receiver.json      format marker and creation time
//   DIR/config.json        optional settings: {"retention": {...}, "pruneInterval": "1h"}
//   DIR/serve.lock         pid and start time of the running `serve` (one writer per data directory)
//   DIR/tls/key.pem        private key (0600), made at init
//   DIR/tls/cert.pem       self-signed certificate; clients pin its SHA-256 fingerprint
//   DIR/catalog.db         SQLite catalog (WAL)
//   DIR/packs/VAULT/*.pack append-only pack files
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { z } from 'zod';
import { X509Certificate } from 'node:crypto';
import { join } from 'node:path';
import { generate } from 'selfsigned';
import { TidemarkError, settingsProblem } from '../shared/errors.js';
import { writeFileDurable } from '../shared/fs-util.js';
import { Catalog } from './catalog.js';
import { parsePolicyOverrides, type PolicyOverrides } from './retention.js';

const MARKER = 'receiver.json';
const MARKER_FORMAT = 'tidemark-receiver';
/** 2: packs gained version 2 (XXH64 entry checksums). */
export const DATA_DIR_VERSION = 2;
/** Read as it is; marked version 2 by the first command that writes packs (openDataDir `forWriting`). */
const LEGACY_DATA_DIR_VERSION = 1;

export interface DataDir {
  root: string;
  config: ReceiverConfig;
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
  writeFileDurable(p.marker, JSON.stringify({ format: MARKER_FORMAT, version: DATA_DIR_VERSION, createdAt: new Date().toISOString() }) + '\n');
  return openDataDir(root);
}

/**
 * `forWriting`: the caller will write packs (serve, prune). A version 1
 * directory is marked version 2 first, so that an older receiver, which would
 * take the new entries for damage, refuses the directory instead.
 */
export function openDataDir(root: string, { forWriting = false } = {}): DataDir {
  const p = paths(root);
  if (!existsSync(p.marker)) {
    throw new TidemarkError('E_USAGE', `${root} is not a receiver data directory; create it with tidemark-receiver init --data ${root}`);
  }
  const marker = checkMarker(p.marker);
  if (forWriting && marker.version === LEGACY_DATA_DIR_VERSION) {
    writeFileDurable(p.marker, JSON.stringify({ ...marker, version: DATA_DIR_VERSION }) + '\n');
  }
  const certPem = readFileSync(p.cert, 'utf8');
  return { root, config: readConfig(join(root, 'config.json')), keyPem: readFileSync(p.key, 'utf8'), certPem, fingerprint: fingerprintOf(certPem), packDir: p.packs, catalogPath: p.catalog };
}

/** Refuses a directory written by another program, or by a newer receiver whose layout this one does not know. */
function checkMarker(path: string): { format?: unknown; version?: unknown } {
  let marker: { format?: unknown; version?: unknown };
  try {
    marker = JSON.parse(readFileSync(path, 'utf8')) as typeof marker;
  } catch (err) {
    throw new TidemarkError('E_STORAGE', `${path} is damaged (${(err as Error).message}); restore it from a backup`, { retryable: false });
  }
  if (marker.format !== MARKER_FORMAT) throw new TidemarkError('E_USAGE', `${path} does not mark a receiver data directory (format ${JSON.stringify(marker.format)})`);
  if (marker.version !== DATA_DIR_VERSION && marker.version !== LEGACY_DATA_DIR_VERSION) {
    throw new TidemarkError('E_STORAGE', `${path}: data directory version ${JSON.stringify(marker.version)}; this receiver reads versions ${LEGACY_DATA_DIR_VERSION} and ${DATA_DIR_VERSION}: use the tidemark release that wrote it`, { retryable: false });
  }
  return marker;
}

const configSchema = z.object({ retention: z.unknown().optional(), pruneInterval: z.string().optional() }).strict();

export interface ReceiverConfig {
  retention: PolicyOverrides;
  pruneInterval?: string;
}

function readConfig(path: string): ReceiverConfig {
  if (!existsSync(path)) return { retention: {} };
  try {
    const parsed = configSchema.parse(JSON.parse(readFileSync(path, 'utf8')));
    return { retention: parsePolicyOverrides(parsed.retention), pruneInterval: parsed.pruneInterval };
  } catch (err) {
    throw new TidemarkError('E_USAGE', `invalid ${path}: ${settingsProblem(err)}; expected {"retention": {"keepWithin": "1h", "keepHourly": 24, "keepDaily": 7, "keepWeekly": 0}, "pruneInterval": "1h"}`);
  }
}

/**
 * One `serve` per data directory: two writers would append to the same packs.
 * The lock holds the holder's pid and, on Linux, its start time: a lock left by a
 * dead process is taken over, also when its pid now belongs to another process
 * (a serve killed or a host rebooted: pids are reused) or to a zombie.
 */
export function acquireServeLock(root: string): () => void {
  const path = join(root, 'serve.lock');
  const own = processStart(process.pid);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(path, own === null ? `${process.pid}\n` : `${process.pid} ${own}\n`, { flag: 'wx' });
      return () => rmSync(path, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const [pidText, startText] = readFileSync(path, 'utf8').trim().split(/\s+/);
      const pid = Number(pidText);
      if (pid > 0 && pid !== process.pid && holds(pid, startText)) {
        throw new TidemarkError('E_CONFLICT', `another tidemark-receiver serve (pid ${pid}) is using ${root}; stop it first`);
      }
      rmSync(path, { force: true });
    }
  }
  throw new TidemarkError('E_CONFLICT', `cannot take ${path}; remove it if no receiver is running`);
}

/** Whether process `pid`, started at `start` (when the lock recorded it), still runs. */
function holds(pid: number, start: string | undefined): boolean {
  if (!isAlive(pid)) return false;
  const stat = procStat(pid);
  if (stat === null) return true; // no /proc: the pid alone decides
  if (stat.state === 'Z' || stat.state === 'X') return false;
  return start === undefined || start === stat.start;
}

function processStart(pid: number): string | null {
  return procStat(pid)?.start ?? null;
}

/** State and start time (clock ticks after boot) of a process, from /proc/PID/stat; null without it. */
function procStat(pid: number): { state: string; start: string } | null {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // pid (comm) state ppid ... : comm may hold spaces and parentheses, so split after its last ')'.
    const fields = text.slice(text.lastIndexOf(')') + 2).trim().split(' ');
    const state = fields[0];
    const start = fields[19]; // field 22 of the line, starttime
    return state && start ? { state, start } : null;
  } catch {
    return null;
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
