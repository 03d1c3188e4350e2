// The blocks of one disk at a recovery point, in block order: pages through
// the point's block map (point.map) and fetches the chunks that are wanted
// (chunks.get, batched by restore/chunk-fetcher.ts), a bounded number ahead,
// each checked before it is handed out (GCM tag, keyed id, the block's
// length). Disk restore, failback and export all read a point through this
// one iterator.
import { openChunk, type VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { MAX_MAP_PAGE, type PointInfo, type Reply } from '../shared/protocol.js';
import { ChunkFetcher, type FetchStats } from './chunk-fetcher.js';

export type PointDisk = PointInfo['disks'][number];

/** Chunk fetches in flight at once; also how far the iterator reads ahead of its consumer. */
const FETCH_CONCURRENCY = 64;

export interface MapBlock {
  index: number;
  offset: number;
  /** The block's length: blockBytes, or less for the disk's short last block. */
  length: number;
  /** Chunk id; null for a zero block (absent from the map). */
  id: Buffer | null;
}

export interface PointBlock extends MapBlock {
  /** What `want` said (true when there is no `want`). */
  wanted: boolean;
  /** The verified plaintext of a wanted block with an id; null otherwise (zero or unwanted). */
  data: Buffer | null;
}

export interface ReadPointOptions {
  /** Yield every block index, zero blocks too (default: only the blocks the map lists). */
  everyBlock?: boolean;
  /**
   * Called once per block, in block order, before its chunk would be fetched:
   * false leaves the block unfetched. Default: every block is wanted.
   */
  want?: (block: MapBlock) => boolean | Promise<boolean>;
}

export function findDisk(point: PointInfo, diskName: string): PointDisk {
  const disk = point.disks.find((d) => d.name === diskName);
  if (!disk) {
    throw new TidemarkError('E_NOT_FOUND', `point ${point.id} has no disk "${diskName}"; it has: ${point.disks.map((d) => d.name).join(', ') || 'none'}`);
  }
  return disk;
}

function blockCountOf(disk: PointDisk): number {
  return Math.ceil(disk.sizeBytes / disk.blockBytes);
}

/**
 * One page of the disk's block map from `fromBlock` (the reply schema checks the page's own
 * order). A page before `fromBlock`, or a `next` that does not advance, would be asked for
 * again and again, or put blocks out of order: the receiver is not to be trusted with that.
 */
export async function mapPage(conn: ReceiverConnection, point: PointInfo, disk: PointDisk, fromBlock: number): Promise<Reply<'point.map'>> {
  const page = await conn.request('point.map', { pointId: point.id, diskId: disk.diskId, fromBlock, limit: MAX_MAP_PAGE });
  if ((page.blocks.length > 0 && page.blocks[0]! < fromBlock) || (page.next !== null && page.next <= fromBlock)) {
    throw new TidemarkError('E_PROTOCOL', `receiver sent a page of point ${point.id}'s map of ${disk.name} that does not follow block ${fromBlock}: the receiver is faulty; tell its operator`);
  }
  return page;
}

/**
 * The point's map entries in block order (only blocks with a chunk), clipped
 * to the disk's size at the point: versions past the end belong to a time
 * the disk was larger. The next page is requested while this one is used.
 */
async function* mapEntries(conn: ReceiverConnection, point: PointInfo, disk: PointDisk): AsyncGenerator<MapBlock> {
  const blockCount = blockCountOf(disk);
  const request = (fromBlock: number) => {
    const page = mapPage(conn, point, disk, fromBlock);
    page.catch(() => {}); // awaited below; a consumer that stops early must not leave it unhandled
    return page;
  };
  let pending = blockCount > 0 ? request(0) : null;
  while (pending) {
    const page = await pending;
    pending = page.next !== null && page.next < blockCount ? request(page.next) : null;
    for (const [i, index] of page.blocks.entries()) {
      if (index >= blockCount) return;
      const offset = index * disk.blockBytes;
      yield { index, offset, length: Math.min(disk.blockBytes, disk.sizeBytes - offset), id: page.ids[i]! };
    }
  }
}

/** Every block index of the disk in order, with id null where the map has none. */
async function* everyBlock(entries: AsyncGenerator<MapBlock>, disk: PointDisk): AsyncGenerator<MapBlock> {
  let index = 0;
  const zero = (i: number): MapBlock => {
    const offset = i * disk.blockBytes;
    return { index: i, offset, length: Math.min(disk.blockBytes, disk.sizeBytes - offset), id: null };
  };
  for await (const entry of entries) {
    while (index < entry.index) yield zero(index++);
    yield entry;
    index = entry.index + 1;
  }
  const blockCount = blockCountOf(disk);
  while (index < blockCount) yield zero(index++);
}

/**
 * Yields the disk's blocks in order with their verified content. Up to
 * FETCH_CONCURRENCY chunks are fetched ahead of the consumer, so memory stays
 * bounded by that many blocks; a chunk needed by several blocks in that
 * window is fetched once.
 */
export async function* readPointBlocks(
  conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, disk: PointDisk, stats: FetchStats, options: ReadPointOptions = {},
): AsyncGenerator<PointBlock> {
  try {
    yield* readBlocks(conn, keys, point, disk, stats, options);
  } catch (err) {
    throw await explainMissing(conn, point, err);
  }
}

/**
 * A chunk or map page not found mid-read: when the point itself is gone (a prune or
 * `forget` on the receiver removed it meanwhile), say so rather than name a chunk.
 */
async function explainMissing(conn: ReceiverConnection, point: PointInfo, err: unknown): Promise<unknown> {
  if (!(err instanceof TidemarkError) || err.code !== 'E_NOT_FOUND' || !conn.isOpen) return err;
  if (await stillListed(conn, point).catch(() => true)) return err;
  return new TidemarkError('E_NOT_FOUND', `point ${point.id} was removed on the receiver (retention or forget) while it was being read; list the points again and use one that is kept`, { cause: err });
}

/** Whether the receiver still lists `point` (prune, on the receiver's schedule, or `forget` may have removed it meanwhile). */
export async function stillListed(conn: ReceiverConnection, point: PointInfo): Promise<boolean> {
  const page = await conn.request('points.list', { host: point.host, afterId: point.id - 1 });
  return page.points.some((p) => p.id === point.id);
}

async function* readBlocks(
  conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, disk: PointDisk, stats: FetchStats, options: ReadPointOptions,
): AsyncGenerator<PointBlock> {
  const fetcher = new ChunkFetcher(conn, disk.blockBytes, stats);
  const fetching = new Map<string, Promise<Buffer>>();
  const fetchChunk = (id: Buffer): Promise<Buffer> => {
    const hex = id.toString('hex');
    let plaintext = fetching.get(hex);
    if (!plaintext) {
      plaintext = fetcher.get(id).then((envelope) => openChunk(keys, id, envelope, disk.blockBytes));
      fetching.set(hex, plaintext);
    }
    return plaintext;
  };
  const resolve = async (block: MapBlock, wanted: boolean, plaintext: Promise<Buffer> | null): Promise<PointBlock> => {
    const data = plaintext ? await plaintext : null;
    if (data && data.length !== block.length) {
      throw new TidemarkError('E_INTEGRITY', `chunk ${block.id!.toString('hex')} has ${data.length} bytes, not the ${block.length} of block ${block.index}`);
    }
    return { ...block, wanted, data };
  };

  const window: Array<{ block: MapBlock; result: Promise<PointBlock> }> = [];
  const next = async (): Promise<PointBlock> => {
    const head = window.shift()!;
    const done = await head.result;
    // Out of the window: a later block with the same id fetches it again.
    if (head.block.id) fetching.delete(head.block.id.toString('hex'));
    return done;
  };
  const entries = mapEntries(conn, point, disk);
  for await (const block of options.everyBlock ? everyBlock(entries, disk) : entries) {
    const wanted = options.want ? await options.want(block) : true;
    const fetch = wanted && block.id !== null;
    if (!fetch && window.length === 0) {
      yield { ...block, wanted, data: null }; // nothing ahead of it, nothing to wait for
      continue;
    }
    const result = resolve(block, wanted, fetch ? fetchChunk(block.id!) : null);
    result.catch(() => {}); // awaited in order below, where its error surfaces
    window.push({ block, result });
    if (window.length >= FETCH_CONCURRENCY) yield await next();
  }
  while (window.length > 0) yield await next();
}
