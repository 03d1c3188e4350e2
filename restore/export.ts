// Export: every disk of a recovery point as one tar stream (tar-stream), to a
// file or stdout. Entries: `disks/<stem>.img` per disk (full length, zeros
// included), then `manifest.json` last, because it holds each image's
// SHA-256, computed while the image streams. Chunks are verified as they
// arrive (restore/point-blocks.ts); the stream has backpressure end to end,
// so memory stays bounded whatever the disk size. The same point always
// exports to the same bytes (entry times are the point's cut time).
import { createHash } from 'node:crypto';
import { rmSync } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import type { Writable } from 'node:stream';
import tar from 'tar-stream';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { Progress, ProgressReporter } from '../shared/progress.js';
import type { PointInfo } from '../shared/protocol.js';
import { diskFileStems } from './disk-file-name.js';
import type { FetchStats } from './chunk-fetcher.js';
import { readPointBlocks, type PointDisk } from './point-blocks.js';
import { withSignalCleanup } from './signal-cleanup.js';
import { createPartial, publishPartial, targetError } from './target-file.js';

export const MANIFEST_NAME = 'manifest.json';

export interface ExportManifest {
  format: 'tidemark-export';
  version: 1;
  host: string;
  point: { id: number; time: string; crashConsistent: boolean };
  disks: Array<{ name: string; file: string; sizeBytes: number; blockBytes: number; sha256: string }>;
}

export interface ExportResult {
  point: number;
  host: string;
  to: string;
  bytesWritten: number;
  bytesFetched: number;
  manifest: ExportManifest;
}

/** `to`: a file to create (written as `<to>.partial`, published when complete, removed on failure) or `-` for stdout. */
export async function exportPoint(conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, to: string): Promise<ExportResult> {
  if (to === '-') return writeTar(conn, keys, point, to, process.stdout);
  if (await stat(to).catch(() => undefined)) throw new TidemarkError('E_CONFLICT', `${to} already exists; remove it or choose another --to`);
  // Opened before anything streams: a path that cannot be created fails here, with its cause.
  const partial = await createPartial(to);
  const removePartial = () => rmSync(partial.path, { force: true });
  try {
    const result = await withSignalCleanup(removePartial, () => writeTar(conn, keys, point, to, partial.file.createWriteStream()));
    const file = await open(partial.path, 'r');
    try {
      await file.sync();
    } finally {
      await file.close();
    }
    await publishPartial(partial.path, to);
    return result;
  } catch (err) {
    removePartial();
    throw err;
  }
}

async function writeTar(conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, to: string, out: Writable): Promise<ExportResult> {
  const stems = diskFileStems(point.disks.map((d) => d.name));
  const manifest: ExportManifest = {
    format: 'tidemark-export',
    version: 1,
    host: point.host,
    point: { id: point.id, time: new Date(point.timeMs).toISOString(), crashConsistent: point.crashConsistent },
    disks: [],
  };
  const mtime = new Date(point.timeMs);
  const stats: FetchStats = { bytesFetched: 0 };
  const progress = new Progress('export', point.disks.reduce((sum, d) => sum + d.sizeBytes, 0));
  const reporter = new ProgressReporter(false); // a TTY on stderr only: stdout may be the tar itself

  const pack = tar.pack();
  let outputError: Error | undefined;
  out.once('error', (err) => (outputError ??= err));
  const writing = pipeline(pack, out);
  writing.catch(() => {}); // awaited below; if filling fails first, its error is the one reported
  try {
    for (const disk of point.disks) {
      const file = `disks/${stems.get(disk.name)}.img`;
      const hash = createHash('sha256');
      const zeros = Buffer.alloc(disk.blockBytes);
      async function* image(): AsyncGenerator<Buffer> {
        for await (const block of readPointBlocks(conn, keys, point, disk, stats, { everyBlock: true })) {
          const data = block.data ?? zeros.subarray(0, block.length);
          hash.update(data);
          progress.add(data.length);
          reporter.report(progress);
          yield data;
        }
      }
      await writeEntry(pack, { name: file, size: disk.sizeBytes, mode: 0o600, mtime }, image());
      manifest.disks.push(diskEntry(disk, file, hash.digest('hex')));
    }
    const manifestBytes = Buffer.from(JSON.stringify(manifest, null, 2) + '\n');
    await writeEntry(pack, { name: MANIFEST_NAME, size: manifestBytes.length, mode: 0o600, mtime }, [manifestBytes]);
    pack.finalize();
    await writing;
    reporter.report(progress, true);
  } catch (err) {
    pack.destroy(err as Error);
    // A failed output (disk full, a closed pipe) shows up here as a destroyed entry: name the cause.
    if (outputError) throw outputFailure(outputError, to === '-' ? 'stdout' : to);
    throw err;
  } finally {
    reporter.done(); // also before an error, which would otherwise continue the progress line
  }
  const bytesWritten = manifest.disks.reduce((sum, d) => sum + d.sizeBytes, 0);
  return { point: point.id, host: point.host, to, bytesWritten, bytesFetched: stats.bytesFetched, manifest };
}

/** Full disk: E_STORAGE, as for every restore; other local errors E_DISK with the path and the fix. */
function outputFailure(err: Error, to: string): unknown {
  const error = targetError(err, to);
  if (error !== err) return error;
  return new TidemarkError('E_DISK', `cannot write the export to ${to}: ${err.message}`, { cause: err });
}

function diskEntry(disk: PointDisk, file: string, sha256: string): ExportManifest['disks'][number] {
  return { name: disk.name, file, sizeBytes: disk.sizeBytes, blockBytes: disk.blockBytes, sha256 };
}

/** Adds one tar entry of `header.size` bytes, written with backpressure. */
async function writeEntry(pack: tar.Pack, header: Partial<tar.Header> & { name: string; size: number }, pieces: AsyncIterable<Buffer> | Iterable<Buffer>): Promise<void> {
  let settle!: (err?: Error | null) => void;
  const finished = new Promise<void>((resolve, reject) => (settle = (err) => (err ? reject(err) : resolve())));
  finished.catch(() => {}); // awaited at the end; an earlier failure is thrown instead
  const entry = pack.entry(header, (err) => settle(err));
  entry.on('error', () => {}); // reported through the entry callback; streamx throws an unheard 'error'
  try {
    for await (const piece of pieces) {
      if (!entry.write(piece)) await drained(entry);
    }
    entry.end(undefined); // (streamx's typings make the argument mandatory)
  } catch (err) {
    entry.destroy(err as Error);
    throw err;
  }
  await finished;
}

type TarEntry = ReturnType<tar.Pack['entry']>;

function drained(stream: TarEntry): Promise<void> {
  return new Promise((resolve, reject) => {
    // Destroyed already (the output failed to open, say): its 'close' has been and gone.
    if (stream.destroyed) return reject(new TidemarkError('E_DISK', 'the export stream was closed'));
    const done = (err?: Error) => {
      stream.off('drain', onDrain);
      stream.off('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = () => done();
    const onClose = () => done(new TidemarkError('E_DISK', 'the export stream was closed'));
    stream.on('drain', onDrain);
    stream.on('close', onClose);
  });
}
