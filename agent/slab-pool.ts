// A fixed number of read buffers in shared memory. Taking one waits while all
// are in use, so the disk reader can never run more than `count` batches
// ahead of the batches still being hashed or sealed: the backpressure that
// keeps the agent's memory flat whatever the disk size.
import { BlockPool } from './block-pool.js';

/** A slab taken from the pool; `release` gives it back once, however often it is called. */
export interface Slab {
  buffer: Buffer;
  release: () => void;
}

export class SlabPool {
  private readonly free: Buffer[] = [];
  private readonly waiters: Array<(buffer: Buffer) => void> = [];

  constructor(count: number, readonly slabBytes: number) {
    for (let i = 0; i < count; i++) this.free.push(BlockPool.sharedBuffer(slabBytes));
  }

  async acquire(): Promise<Slab> {
    const buffer = this.free.pop() ?? (await new Promise<Buffer>((resolve) => this.waiters.push(resolve)));
    let held = true;
    const release = (): void => {
      if (held) this.give(buffer);
      held = false;
    };
    return { buffer, release };
  }

  private give(buffer: Buffer): void {
    const waiter = this.waiters.shift();
    if (waiter) waiter(buffer);
    else this.free.push(buffer);
  }
}
