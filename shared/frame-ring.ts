// Memory for the large frames a connection sends (chunk.put), reused rather
// than allocated per frame. A fresh buffer per 64 KiB chunk that lives until
// the socket has taken it outlives young-generation collections, and V8 then
// frees it only by a full mark-compact: ~50 of them per GiB of initial sync,
// most of the agent's garbage-collection time.
//
// Regions are taken in send order and released when the socket is done with
// them, normally in the same order. A region is handed out again only once
// it and every region taken before it are released, so a frame still waiting
// in the socket is never overwritten. When there is no such room (the ring is
// full of frames still queued), take() returns a fresh buffer instead.

interface Region {
  start: number;
  end: number;
  released: boolean;
}

export class FrameRing {
  private memory: Buffer | null = null;
  /** Regions handed out and not yet reusable, oldest first. */
  private readonly live: Region[] = [];

  constructor(readonly bytes: number) {}

  /** `length` bytes no unreleased frame uses; from the ring when it has room, else fresh. */
  take(length: number): Buffer {
    const start = this.freeStart(length);
    if (start === null) return Buffer.allocUnsafe(length);
    this.memory ??= Buffer.allocUnsafeSlow(this.bytes); // on first use: connections that never send chunks pay nothing
    this.live.push({ start, end: start + length, released: false });
    return this.memory.subarray(start, start + length);
  }

  /** The socket is done with `frame`; a frame take() did not give out of the ring is ignored. */
  release(frame: Buffer): void {
    if (this.memory === null || frame.buffer !== this.memory.buffer) return;
    const start = frame.byteOffset - this.memory.byteOffset;
    const region = this.live.find((r) => r.start === start && !r.released);
    if (region) region.released = true;
    while (this.live[0]?.released) this.live.shift();
  }

  /** Where `length` bytes fit after the newest live region, wrapping to the start when the oldest one has moved on. */
  private freeStart(length: number): number | null {
    if (length === 0 || length > this.bytes) return null;
    const oldest = this.live[0];
    const newest = this.live.at(-1);
    if (!oldest || !newest) return 0;
    const wrapped = newest.start < oldest.start; // live bytes run from oldest to the end, then from 0 to newest
    const limit = wrapped ? oldest.start : this.bytes;
    if (newest.end + length <= limit) return newest.end;
    if (!wrapped && length <= oldest.start) return 0;
    return null;
  }
}
