// Baselines measured in the same run on the same image, so each figure of the
// bench can be read as a ratio that holds on a noisy machine.
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, rmSync } from 'node:fs';
import { envelopeSlotBytes, scanBlocks, sealBlocks } from '../agent/block-work.js';
import { CHUNK_ID_BYTES, VaultKeys, openChunk } from '../shared/chunk-crypto.js';

export interface Timed {
  seconds: number;
  bytes: number;
  mibPerSecond: number;
}

const MiB = 1024 * 1024;

export function timed(bytes: number, run: () => void): Timed {
  const start = process.hrtime.bigint();
  run();
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  return { seconds, bytes, mibPerSecond: bytes / MiB / seconds };
}

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr.trim()}`);
}

/** Drops one file's pages from the page cache (GNU dd's nocache), so the next read comes from the disk. */
export function dropFromCache(path: string): void {
  sh('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
}

/** Loads a file into the page cache. */
export function warmCache(path: string): void {
  sh('dd', [`if=${path}`, 'of=/dev/null', 'bs=16M', 'status=none']);
}

/** Sequential read of the image in 16 MiB pieces. */
export function rawRead(path: string, bytes: number): Timed {
  return timed(bytes, () => warmCache(path));
}

/** The lz4 CLI at level 1 (single-threaded in lz4 ≤ 1.9), output discarded. */
export function lz4Cli(path: string, bytes: number): Timed {
  return timed(bytes, () => sh('lz4', ['-1', '-q', '-f', path, '/dev/null']));
}

/**
 * The agent's own per-block work (agent/block-work.ts: a zero test of every
 * block, then its hash, the keyed id, lz4 and AES-GCM of every non-zero one) on one
 * core of this process, the image read from the page cache: what one worker
 * thread can do before transport, storage and the receiver take their share.
 */
export function perBlockWork(path: string, bytes: number, blockBytes: number): Timed {
  return timed(bytes, () => forEachSealedPiece(path, bytes, blockBytes, () => {}));
}

/**
 * What a restore does to each stored block (shared/chunk-crypto.ts openChunk:
 * AES-GCM, lz4, the keyed-id check) on one core of this process, timed alone:
 * the envelopes are sealed beforehand, 4 MiB of image at a time.
 */
export function chunkOpenWork(path: string, bytes: number, blockBytes: number): Timed {
  let seconds = 0;
  forEachSealedPiece(path, bytes, blockBytes, (keys, ids, envelopes) => {
    const start = process.hrtime.bigint();
    envelopes.forEach((envelope, n) => openChunk(keys, ids[n]!, envelope, blockBytes));
    seconds += Number(process.hrtime.bigint() - start) / 1e9;
  });
  return { seconds, bytes, mibPerSecond: bytes / MiB / seconds };
}

/** Reads the image in 4 MiB pieces and does the agent's per-block work on each; `then` gets every piece's envelopes. */
function forEachSealedPiece(path: string, bytes: number, blockBytes: number, then: (keys: VaultKeys, ids: Buffer[], envelopes: Buffer[]) => void): void {
  const keys = VaultKeys.fromMaster(randomBytes(32));
  const piece = Buffer.allocUnsafe(4 * MiB);
  const slotBytes = envelopeSlotBytes(blockBytes);
  const sealed = Buffer.allocUnsafe(Math.ceil(piece.length / blockBytes) * slotBytes);
  const fd = openSync(path, 'r');
  try {
    for (let at = 0; at < bytes; at += piece.length) {
      const data = piece.subarray(0, readSync(fd, piece, 0, piece.length, at));
      const scanned = scanBlocks(keys, data, blockBytes, null);
      const stored = [...scanned.changed.keys()].filter((n) => scanned.zero[n] === 0);
      const ids = stored.map((n) => Buffer.from(scanned.ids.subarray(n * CHUNK_ID_BYTES, (n + 1) * CHUNK_ID_BYTES)));
      const lengths = sealBlocks(keys, data, blockBytes, Uint32Array.from(stored, (n) => scanned.changed[n]!), Buffer.concat(ids), sealed, Uint32Array.from(stored.keys()));
      const envelopes = [...lengths].map((length, n) => sealed.subarray(n * slotBytes, n * slotBytes + length));
      then(keys, ids, envelopes);
    }
  } finally {
    closeSync(fd);
  }
}

/**
 * A plain copy of the image, fsynced as restore fsyncs its file: `sync FILE`
 * flushes that file only (`sync -f` flushed its whole filesystem, other
 * files' pending writes included).
 */
export function copyImage(path: string, to: string, bytes: number): Timed {
  try {
    return timed(bytes, () => {
      sh('cp', [path, to]);
      sh('sync', [to]);
    });
  } finally {
    rmSync(to, { force: true });
  }
}

export function lz4Available(): string | null {
  try {
    execFileSync('lz4', ['--version'], { stdio: 'ignore' });
    return null;
  } catch {
    return 'the lz4 CLI is not installed (apt-get install lz4)';
  }
}
