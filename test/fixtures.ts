// Test/demo fixtures: deterministic disk images (mixed random/text/zero
// content, real ext4 filesystems built without mounting) and helpers to
// change them between syncs.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, mkdir, mkdtemp, open, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { gzipSync } from 'node:zlib';
import { TidemarkError } from '../shared/errors.js';

const MiB = 1024 * 1024;
const REGION_BYTES = MiB;

/** Seeded PRNG (mulberry32): returns uint32s. Fast, not cryptographic. */
export function makePrng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/** `length` pseudo-random bytes, filled 4 bytes at a time. */
function randomBuffer(next: () => number, length: number): Buffer {
  const words = new Uint32Array(Math.ceil(length / 4));
  for (let i = 0; i < words.length; i++) words[i] = next();
  return Buffer.from(words.buffer, 0, length);
}

/** Compressible text: an English-ish line repeated, each naming its own offset (so no two blocks are identical). */
function textBuffer(offset: number, length: number): Buffer {
  const lines: string[] = [];
  let size = 0;
  while (size < length) {
    const line = `At offset ${offset + size} the replication agent wrote this sentence again, as it does every time.\n`;
    lines.push(line);
    size += line.length;
  }
  return Buffer.from(lines.join(''), 'latin1').subarray(0, length);
}

/**
 * Writes a disk image of sizeBytes at path mixing random data, repetitive
 * text and zero regions (~1 MiB each, kind chosen by a PRNG from `seed`).
 * Zero regions are left as holes: the file is ftruncated to size first.
 */
export async function writeMixedImage(path: string, sizeBytes: number, seed: number): Promise<void> {
  const next = makePrng(seed);
  const handle = await open(path, 'w');
  try {
    await handle.truncate(sizeBytes);
    for (let offset = 0; offset < sizeBytes; offset += REGION_BYTES) {
      const length = Math.min(REGION_BYTES, sizeBytes - offset);
      const kind = next() % 3; // 0 random, 1 text, 2 zeros (hole)
      if (kind === 2) continue;
      const data = kind === 0 ? randomBuffer(next, length) : textBuffer(offset, length);
      await handle.write(data, 0, length, offset);
    }
  } finally {
    await handle.close();
  }
}

/** Picks `count` distinct integers in [0, n) with the PRNG. */
function pickDistinct(next: () => number, n: number, count: number): number[] {
  if (count * 2 <= n) {
    const picked = new Set<number>();
    while (picked.size < count) picked.add(next() % n);
    return [...picked];
  }
  // Dense case: partial Fisher-Yates.
  const all = Array.from({ length: n }, (_, i) => i);
  for (let i = 0; i < count; i++) {
    const j = i + (next() % (n - i));
    [all[i], all[j]] = [all[j]!, all[i]!];
  }
  return all.slice(0, count);
}

/**
 * Overwrites `count` distinct blocks (of blockBytes, chosen by a seeded PRNG)
 * with new random content; returns the sorted block indices changed. The
 * image never grows: a short final block is overwritten only up to its length.
 */
export async function changeBlocks(path: string, blockBytes: number, count: number, seed: number): Promise<number[]> {
  const sizeBytes = (await stat(path)).size;
  const blocks = Math.ceil(sizeBytes / blockBytes);
  if (!Number.isInteger(count) || count < 0 || count > blocks) {
    throw new TidemarkError('E_USAGE', `cannot change ${count} blocks of ${path}: it has only ${blocks} blocks of ${blockBytes} bytes`);
  }
  const next = makePrng(seed);
  const indices = pickDistinct(next, blocks, count).sort((a, b) => a - b);
  const handle = await open(path, 'r+');
  try {
    for (const index of indices) {
      const offset = index * blockBytes;
      const length = Math.min(blockBytes, sizeBytes - offset);
      await handle.write(randomBuffer(next, length), 0, length, offset);
    }
  } finally {
    await handle.close();
  }
  return indices;
}

/** Runs an e2fsprogs tool by name, falling back to /usr/sbin/NAME (non-root PATH often lacks it). */
function runE2fsTool(name: string, args: string[], input?: string): string {
  for (const candidate of [name, `/usr/sbin/${name}`, `/sbin/${name}`]) {
    try {
      return execFileSync(candidate, args, { input, encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      const stderr = String((err as { stderr?: unknown }).stderr ?? '').trim();
      throw new TidemarkError('E_USAGE', `${name} ${args.join(' ')} failed: ${stderr || (err as Error).message}`, { cause: err });
    }
  }
  throw new TidemarkError('E_USAGE', `${name} not found: install e2fsprogs (e.g. apt-get install e2fsprogs) to build ext4 test images`);
}

/** Log-like text lines, deterministic from the PRNG. */
function logText(next: () => number, bytes: number): string {
  const levels = ['INFO', 'INFO', 'INFO', 'DEBUG', 'WARN', 'ERROR'];
  const events = ['request served', 'cache miss', 'connection opened', 'connection closed', 'checkpoint written', 'retrying upload'];
  const lines: string[] = [];
  let size = 0;
  let t = 1_700_000_000_000 + (next() % 1_000_000) * 1000;
  while (size < bytes) {
    t += next() % 5000;
    const line = `${new Date(t).toISOString()} ${levels[next() % levels.length]} worker-${next() % 16} ${events[next() % events.length]} id=${next().toString(16)} latency_ms=${next() % 900}\n`;
    lines.push(line);
    size += line.length;
  }
  return lines.join('');
}

/** Fills dir with ~budget bytes of mixed content: random binaries, logs, gzip archives and a duplicated directory. */
async function populateTree(dir: string, budget: number, next: () => number): Promise<void> {
  const share = (fraction: number) => Math.floor(budget * fraction);
  const writeFiles = async (sub: string, total: number, make: (len: number) => Buffer | string, ext: string) => {
    await mkdir(join(dir, sub), { recursive: true });
    const names: string[] = [];
    for (let written = 0, i = 0; written < total; i++) {
      const len = Math.min(total - written, 16 * 1024 + (next() % (2 * MiB)));
      const name = join(dir, sub, `file-${String(i).padStart(3, '0')}.${ext}`);
      await writeFile(name, make(len));
      names.push(name);
      written += len;
    }
    return names;
  };
  await writeFiles('bin', share(0.35), (len) => randomBuffer(next, len), 'bin');
  await writeFiles('logs', share(0.25), (len) => logText(next, len).slice(0, len), 'log');
  // Already-compressed data: gzip of log text; size each archive by its compressed length.
  await mkdir(join(dir, 'archive'), { recursive: true });
  for (let written = 0, i = 0; written < share(0.15); i++) {
    const gz = gzipSync(logText(next, 256 * 1024 + (next() % (4 * MiB))));
    await writeFile(join(dir, 'archive', `logs-${String(i).padStart(3, '0')}.log.gz`), gz);
    written += gz.length;
  }
  // The same files twice, so a deduplicating store sees identical chunks.
  const originals = await writeFiles('projects/current', share(0.125), (len) => randomBuffer(next, len), 'dat');
  await mkdir(join(dir, 'projects/backup-copy'), { recursive: true });
  for (const file of originals) await copyFile(file, file.replace('projects/current', 'projects/backup-copy'));
}

/**
 * Builds a real ext4 image of sizeBytes without mounting: fills a temp
 * directory with ~fillFraction of sizeBytes of content, then
 * `mkfs.ext4 -d DIR`. Contents are seeded; mkfs still stamps timestamps.
 */
export async function writeExt4Image(path: string, sizeBytes: number, seed: number, fillFraction = 0.4): Promise<void> {
  const next = makePrng(seed);
  const dir = await mkdtemp(join(tmpdir(), 'tidemark-ext4-'));
  try {
    await populateTree(dir, Math.floor(sizeBytes * fillFraction), next);
    const handle = await open(path, 'w');
    try {
      await handle.truncate(sizeBytes);
    } finally {
      await handle.close();
    }
    // Seed-derived UUID and hash seed so the superblock varies only by time.
    const uuid = randomBuffer(next, 16).toString('hex').replace(/^(.{8})(.{4})(.{4})(.{4})(.{12})$/, '$1-$2-$3-$4-$5');
    runE2fsTool('mkfs.ext4', ['-q', '-F', '-U', uuid, '-E', `root_owner=0:0,hash_seed=${uuid}`, '-d', dir, path]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** debugfs quoting for a command argument. */
function debugfsQuote(arg: string): string {
  if (/["\n]/.test(arg)) throw new TidemarkError('E_USAGE', `path ${JSON.stringify(arg)} cannot be passed to debugfs`);
  return `"${arg}"`;
}

/**
 * Adds or overwrites a file in an unmounted ext4 image via debugfs; the
 * content is `bytes` seeded random bytes. The parent directory must exist.
 */
export async function addFileToExt4Image(image: string, destName: string, bytes: number, seed: number): Promise<void> {
  const dest = posix.normalize(`/${destName}`);
  const parent = posix.dirname(dest);
  const name = posix.basename(dest);
  const dir = await mkdtemp(join(tmpdir(), 'tidemark-debugfs-'));
  try {
    const src = join(dir, 'content');
    await writeFile(src, randomBuffer(makePrng(seed), bytes));
    // `write` refuses to overwrite, so rm first (an error for a missing file is harmless);
    // cd + basename keeps older debugfs versions from linking a name containing "/".
    const script = [`cd ${debugfsQuote(parent)}`, `rm ${debugfsQuote(name)}`, `write ${debugfsQuote(src)} ${debugfsQuote(name)}`, ''].join('\n');
    runE2fsTool('debugfs', ['-w', '-f', '-', image], script);
    // debugfs exits 0 even when a command fails: confirm the file is there with the right size.
    const statOut = runE2fsTool('debugfs', ['-R', `stat ${debugfsQuote(dest)}`, image]);
    const size = /\bSize: (\d+)/.exec(statOut)?.[1];
    if (size === undefined || Number(size) !== bytes) {
      throw new TidemarkError('E_USAGE', `debugfs could not write ${dest} into ${image}: does ${parent} exist and is there free space?`);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** SHA-256 of a file (or device), hex, streamed. */
export function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path, { highWaterMark: 4 * MiB })
      .on('error', reject)
      .on('data', (chunk) => hash.update(chunk))
      .on('end', () => resolve(hash.digest('hex')));
  });
}
