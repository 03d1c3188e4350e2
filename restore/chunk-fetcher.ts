// Chunk envelopes by id, fetched in batches (chunks.get, docs/SPEC.md §3.4): the
// ids asked for while the caller runs go out together once it waits for I/O, or
// as soon as a batch is full, so a restore makes one request per ~1 MiB of
// chunks rather than one per chunk, saving per-request work on both ends.
//
// Each id's promise settles on its own: the receiver answers a prefix of a
// batch and the rest is asked for again, so a damaged or missing chunk fails
// only the blocks that use it.
//
// A receiver released before chunks.get does not list it in its hello reply;
// from that one the chunks are fetched one chunk.get each, as restores did then.
import { CHUNK_OVERHEAD_BYTES } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { MAX_GET_REPLY_BYTES, MAX_IDS_PER_GET } from '../shared/protocol.js';

interface Wanted {
  id: Buffer;
  resolve: (envelope: Buffer) => void;
  reject: (err: Error) => void;
}

/** What the fetcher received: envelope bytes. */
export interface FetchStats {
  bytesFetched: number;
}

export class ChunkFetcher {
  /** Ids per request: as many as one reply can carry however little they compress. */
  private readonly batchIds: number;
  private readonly batched: boolean;
  private queued: Wanted[] = [];
  private sendScheduled = false;

  /** `conn` has said hello (ReceiverConnection.hello): that tells whether the receiver handles chunks.get. */
  constructor(private readonly conn: ReceiverConnection, blockBytes: number, private readonly stats: FetchStats) {
    this.batchIds = Math.max(1, Math.min(MAX_IDS_PER_GET, Math.floor(MAX_GET_REPLY_BYTES / (blockBytes + CHUNK_OVERHEAD_BYTES))));
    this.batched = conn.supports('chunks.get');
  }

  /** The chunk's envelope as stored (not yet opened or checked). */
  get(id: Buffer): Promise<Buffer> {
    if (!this.batched) {
      return this.conn.request('chunk.get', { id }).then(({ data }) => {
        this.stats.bytesFetched += data.length;
        return data;
      });
    }
    return new Promise<Buffer>((resolve, reject) => {
      this.queued.push({ id, resolve, reject });
      if (this.queued.length >= this.batchIds) this.send(this.queued.splice(0));
      else this.scheduleSend();
    });
  }

  private scheduleSend(): void {
    if (this.sendScheduled) return;
    this.sendScheduled = true;
    setImmediate(() => {
      this.sendScheduled = false;
      if (this.queued.length > 0) this.send(this.queued.splice(0));
    });
  }

  private send(batch: Wanted[]): void {
    this.conn.request('chunks.get', { ids: batch.map((w) => w.id) }).then(
      ({ data }) => {
        if (data.length > batch.length) {
          const err = new TidemarkError('E_PROTOCOL', `receiver sent ${data.length} chunks for ${batch.length} ids`);
          for (const wanted of batch) wanted.reject(err);
          return;
        }
        data.forEach((envelope, i) => {
          this.stats.bytesFetched += envelope.length;
          batch[i]!.resolve(envelope);
        });
        if (data.length < batch.length) this.send(batch.slice(data.length));
      },
      (err: Error) => {
        // The error is the first id's; the others may still be readable, unless the session is gone.
        if (!this.conn.isOpen) return batch.forEach((wanted) => wanted.reject(err));
        batch[0]!.reject(err);
        if (batch.length > 1) this.send(batch.slice(1));
      },
    );
  }
}
