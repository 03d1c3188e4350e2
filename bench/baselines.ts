// Baselines measured in the same run on the same image, so each figure of the
// bench can be read as a ratio that holds on a noisy machine.
import { execFileSync, spawnSync } from 'node:child_process';
import { rmSync } from 'node:fs';

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

/** A plain copy of the image, flushed to disk (restore fsyncs too). */
export function copyImage(path: string, to: string, bytes: number): Timed {
  try {
    return timed(bytes, () => {
      sh('cp', [path, to]);
      sh('sync', ['-f', to]);
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
