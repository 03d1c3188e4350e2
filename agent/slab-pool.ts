// A fixed number of read buffers in shared memory. Taking one waits while all
// are in use, so the disk reader can never run more than `count` batches
// ahead of the batches still being hashed, sealed or sent: the backpressure
// that keeps the agent's memory flat whatever the disk size.
import { BlockPool } from './block-pool.js';

export class SlabPool {
  private readonly free: Buffer[] = [];
  private readonly waiters: Array<(slab: Buffer) => void> = [];

  constructor(count: number, readonly slabBytes: number) {
    for (let i = 0; i < count; i++) this.free.push(BlockPool.sharedBuffer(slabBytes));
  }

  acquire(): Promise<Buffer> {
    const slab = this.free.pop();
    if (slab) return Promise.resolve(slab);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(slab: Buffer): void {
    const waiter = this.waiters.shift();
    if (waiter) waiter(slab);
    else this.free.push(slab);
  }
}
