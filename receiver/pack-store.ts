// Chunk storage: append-only pack files with group commit (docs/SPEC.md §4.2).
//
// put() resolves only after the pack data is fsynced *and* the catalog row
// that locates it is committed, so an acknowledged chunk survives any crash.
// Concurrent puts are batched: one writev + one fsync + one catalog
// transaction per batch. The fsync runs on the libuv thread pool, so the
// event loop keeps taking frames meanwhile: whatever arrives during one
// flush's fsync forms the next batch (group commit), and batches grow with
// the load instead of one fsync per handful of chunks.
import { mkdirSync, openSync, closeSync, fsync, fsyncSync, readSync, ftruncateSync, rmSync } from 'node:fs';
import { promisify } from 'node:util';
import { join, dirname } from 'node:path';
import { xxh3, xxh64 } from '@node-rs/xxhash';
import { TidemarkError, asTidemarkError } from '../shared/errors.js';
import { fsyncDir, writeAllSync } from '../shared/fs-util.js';
import type { Catalog, NewChunk } from './catalog.js';

export const PACK_MAGIC = Buffer.from('TMPK');
export const PACK_VERSION = 2;
/** Packs written before XXH64 entries; still read, and rewritten as version 2 when compacted. */
export const LEGACY_PACK_VERSION = 1;
export const PACK_HEADER_BYTES = 8; // magic 4 | version 1 | reserved 3
export const ENTRY_MAGIC = Buffer.from('TMPF');
export const LEGACY_ENTRY_MAGIC = Buffer.from('TMPE');
export const ENTRY_HEADER_BYTES = 56; // magic 4 | length u32 | chunk id 32 | checksum of envelope 16
const PACK_TARGET_BYTES = 64 * 1024 * 1024;
const fsyncAsync = promisify(fsync);
/** A pack nobody appended to for this long is sealed, so that prune may compact it. */
const PACK_IDLE_SEAL_MS = 2000;

/** What the receiver needs from chunk storage; a second backend (object storage) implements the same. */
export interface ChunkStore {
  /** Stores a chunk durably; false when the vault already had it. */
  put(vaultId: string, id: Buffer, envelope: Buffer): Promise<boolean>;
  /** Reads a chunk and checks its checksum; E_INTEGRITY when damaged. */
  get(vaultId: string, id: Buffer): Promise<Buffer>;
  close(): Promise<void>;
}

/**
 * The entry checksum: XXH64 of the envelope, big-endian, in the first 8 of the
 * header's 16 checksum bytes (the rest zero). @node-rs/xxhash's XXH3-128, the
 * checksum of version 1 entries, hashes ~8x slower here (~2 GB/s): it was a
 * fifth of the receiver's CPU in a restore.
 */
export function envelopeChecksum(envelope: Buffer): Buffer {
  const out = Buffer.alloc(16);
  out.writeBigUInt64BE(xxh64(envelope), 0);
  return out;
}

/** The checksum of a version 1 (LEGACY_ENTRY_MAGIC) entry: XXH3-128, high 64 bits then low, big-endian. */
function legacyEnvelopeChecksum(envelope: Buffer): Buffer {
  const sum = xxh3.xxh128(envelope);
  const out = Buffer.alloc(16);
  out.writeBigUInt64BE(sum >> 64n, 0);
  out.writeBigUInt64BE(sum & 0xffffffffffffffffn, 8);
  return out;
}

/** The header this receiver writes for an entry. */
export function encodeEntryHeader(id: Buffer, envelope: Buffer): Buffer {
  return entryHeader(ENTRY_MAGIC, envelopeChecksum(envelope), id, envelope.length);
}

/**
 * The header an intact entry holding this chunk would have, in the format the
 * stored header names by its magic: a version 1 entry is checked as one.
 */
export function expectedEntryHeader(stored: Buffer, id: Buffer, envelope: Buffer): Buffer {
  const legacy = stored.subarray(0, 4).equals(LEGACY_ENTRY_MAGIC);
  return legacy ? entryHeader(LEGACY_ENTRY_MAGIC, legacyEnvelopeChecksum(envelope), id, envelope.length) : encodeEntryHeader(id, envelope);
}

/** Whether a stored entry (header and envelope) is intact and holds this chunk. */
export function entryIsIntact(entry: Buffer, id: Buffer): boolean {
  const stored = entry.subarray(0, ENTRY_HEADER_BYTES);
  return entry.length >= ENTRY_HEADER_BYTES && stored.equals(expectedEntryHeader(stored, id, entry.subarray(ENTRY_HEADER_BYTES)));
}

function entryHeader(magic: Buffer, checksum: Buffer, id: Buffer, envelopeBytes: number): Buffer {
  const header = Buffer.alloc(ENTRY_HEADER_BYTES);
  magic.copy(header, 0);
  header.writeUInt32BE(envelopeBytes, 4);
  id.copy(header, 8);
  checksum.copy(header, 40);
  return header;
}

interface QueuedPut {
  vaultId: string;
  id: Buffer;
  envelope: Buffer;
  done: Promise<boolean>;
  resolve: (stored: boolean) => void;
  reject: (err: Error) => void;
}

interface OpenPack {
  packId: number;
  fd: number;
  sizeBytes: number;
  idleTimer: NodeJS.Timeout | null;
}

export class LocalPackStore implements ChunkStore {
  private queue: QueuedPut[] = [];
  private readonly queuedById = new Map<string, QueuedPut>();
  private flushing: Promise<void> | null = null;
  private readonly openPacks = new Map<string, OpenPack>();
  private closed = false;

  constructor(
    private readonly packDir: string,
    private readonly catalog: Catalog,
  ) {
    mkdirSync(packDir, { recursive: true });
  }

  put(vaultId: string, id: Buffer, envelope: Buffer): Promise<boolean> {
    if (this.closed) return Promise.reject(new TidemarkError('E_STATE', 'chunk store is closed'));
    const key = `${vaultId}:${id.toString('hex')}`;
    const queued = this.queuedById.get(key);
    if (queued) return queued.done.then(() => false);
    if (this.catalog.hasChunk(vaultId, id)) return Promise.resolve(false);
    let resolve!: (v: boolean) => void;
    let reject!: (e: Error) => void;
    const done = new Promise<boolean>((res, rej) => ((resolve = res), (reject = rej)));
    const put = { vaultId, id, envelope, done, resolve, reject };
    this.queue.push(put);
    this.queuedById.set(key, put);
    this.scheduleFlush();
    return done;
  }

  async get(vaultId: string, id: Buffer): Promise<Buffer> {
    try {
      return this.read(vaultId, id);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      // Compaction may have moved the chunk between the lookup and the open: look it up again.
      try {
        return this.read(vaultId, id);
      } catch (again) {
        if ((again as NodeJS.ErrnoException).code !== 'ENOENT') throw again;
        // Stored data is gone, not this request's or the client's disk (E_DISK).
        throw new TidemarkError('E_INTEGRITY', `chunk ${id.toString('hex')} is in a pack file missing from the receiver's data directory (${(again as Error).message}); run tidemark-receiver verify`, { cause: again });
      }
    }
  }

  private read(vaultId: string, id: Buffer): Buffer {
    const loc = this.catalog.chunkLocation(vaultId, id);
    if (!loc) throw new TidemarkError('E_NOT_FOUND', `chunk ${id.toString('hex')} is not stored in this vault`);
    const fd = openSync(join(this.packDir, loc.file), 'r');
    try {
      const entry = Buffer.allocUnsafe(ENTRY_HEADER_BYTES + loc.length); // a short read is refused below, never sent
      const read = readSync(fd, entry, 0, entry.length, loc.offset);
      if (read !== entry.length || !entryIsIntact(entry, id)) {
        throw new TidemarkError('E_INTEGRITY', `chunk ${id.toString('hex')} in pack ${loc.file} at offset ${loc.offset} is damaged (checksum mismatch); run tidemark-receiver verify`);
      }
      return entry.subarray(ENTRY_HEADER_BYTES);
    } finally {
      closeSync(fd);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    while (this.flushing) await this.flushing;
    for (const [vaultId, pack] of [...this.openPacks]) this.sealPack(vaultId, pack);
  }

  private scheduleFlush(): void {
    if (this.flushing) return;
    this.flushing = new Promise<void>((resolve) => setImmediate(resolve)).then(async () => {
      while (this.queue.length > 0) await this.flushBatch(this.queue.splice(0));
      this.flushing = null;
    });
  }

  /** One batch: append every entry, fsync each pack touched, then one catalog transaction. */
  private async flushBatch(batch: QueuedPut[]): Promise<void> {
    const rows: NewChunk[] = [];
    const packSizes = new Map<number, number>();
    const touched = new Map<string, { pack: OpenPack; goodSize: number }>();
    try {
      for (const put of batch) {
        const pack = this.packFor(put.vaultId);
        if (!touched.has(put.vaultId)) touched.set(put.vaultId, { pack, goodSize: pack.sizeBytes });
        const header = encodeEntryHeader(put.id, put.envelope);
        // All of it or an error: a short write on a full disk must not leave a gap the catalog points past.
        writeAllSync(pack.fd, [header, put.envelope], pack.sizeBytes);
        rows.push({ vaultId: put.vaultId, id: put.id, packId: pack.packId, offset: pack.sizeBytes, length: put.envelope.length });
        pack.sizeBytes += header.length + put.envelope.length;
        packSizes.set(pack.packId, pack.sizeBytes);
      }
      await Promise.all([...touched.values()].map(({ pack }) => fsyncAsync(pack.fd)));
      this.catalog.insertChunks(rows, packSizes);
      for (const [vaultId, { pack }] of touched) {
        if (pack.sizeBytes >= PACK_TARGET_BYTES) this.sealPack(vaultId, pack);
        else this.sealWhenIdle(vaultId, pack);
      }
      for (const put of batch) put.resolve(true);
    } catch (err) {
      // A pack that failed once is not written again: cut it back to its last good size and start a new one.
      for (const [vaultId, { pack, goodSize }] of touched) {
        try {
          ftruncateSync(pack.fd, goodSize);
        } catch {
          /* the catalog never referenced the bytes past goodSize */
        }
        this.sealPack(vaultId, pack);
      }
      const error = asTidemarkError(err, { storage: 'receiver' });
      for (const put of batch) put.reject(error);
    } finally {
      for (const put of batch) this.queuedById.delete(`${put.vaultId}:${put.id.toString('hex')}`);
    }
  }

  private packFor(vaultId: string): OpenPack {
    const open = this.openPacks.get(vaultId);
    if (open) return open;
    const file = join(vaultId, `${Date.now().toString(36)}-${process.pid}-${Math.random().toString(36).slice(2, 8)}.pack`);
    const path = join(this.packDir, file);
    mkdirSync(dirname(path), { recursive: true });
    const fd = openSync(path, 'wx', 0o600);
    let packId: number;
    try {
      const header = Buffer.alloc(PACK_HEADER_BYTES);
      PACK_MAGIC.copy(header, 0);
      header[4] = PACK_VERSION;
      writeAllSync(fd, [header], 0);
      fsyncSync(fd);
      fsyncDir(dirname(path));
      packId = this.catalog.createPack(vaultId, file);
    } catch (err) {
      // A full disk fails here on every retry: leave no empty pack file behind each time.
      closeSync(fd);
      rmSync(path, { force: true });
      throw err;
    }
    const pack: OpenPack = { packId, fd, sizeBytes: PACK_HEADER_BYTES, idleTimer: null };
    this.openPacks.set(vaultId, pack);
    return pack;
  }

  private sealWhenIdle(vaultId: string, pack: OpenPack): void {
    if (pack.idleTimer) clearTimeout(pack.idleTimer);
    pack.idleTimer = setTimeout(() => {
      if (this.openPacks.get(vaultId) === pack && !this.flushing) this.sealPack(vaultId, pack);
      else if (this.openPacks.get(vaultId) === pack) this.sealWhenIdle(vaultId, pack);
    }, PACK_IDLE_SEAL_MS);
    pack.idleTimer.unref();
  }

  /** Closes a pack for good: it is never appended to again, and prune may compact it. */
  private sealPack(vaultId: string, pack: OpenPack): void {
    if (pack.idleTimer) clearTimeout(pack.idleTimer);
    if (this.openPacks.get(vaultId) === pack) this.openPacks.delete(vaultId);
    closeSync(pack.fd);
    try {
      this.catalog.sealPack(pack.packId);
    } catch {
      /* left unsealed: sealed at the next serve start, compacted later */
    }
  }
}
