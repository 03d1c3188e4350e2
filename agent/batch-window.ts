// The batches a pass has sent and the receiver has not yet acknowledged.
//
// A batch gives its read slab back as soon as its frames are handed to the
// connection, so the slabs bound only the batches being read, hashed and
// sealed. This window bounds the rest: at most `limit` batches wait on the
// receiver's fsyncs at a time, which bounds what one agent has in flight
// there, and the agent keeps no record per batch of a whole disk.

export class BatchWindow {
  /** Oldest first; each settles when its batch does, and never rejects (failures go to `failure`). */
  private readonly waiting: Array<Promise<void>> = [];
  private failure: { reason: unknown } | null = null;

  constructor(readonly limit: number) {}

  /** Whether a batch has failed: the pass stops starting new ones. */
  get failed(): boolean {
    return this.failure !== null;
  }

  /**
   * Waits until fewer than `limit` batches are in the window, by waiting for the oldest. A scan's
   * batches finish in order; a continuous round's groups may not, and then the window holds
   * fewer than `limit` unsettled batches for a while, never more.
   */
  async room(): Promise<void> {
    while (this.waiting.length >= this.limit) await this.waiting.shift();
  }

  add(batch: Promise<void>): void {
    this.waiting.push(batch.then(() => undefined, (reason: unknown) => void (this.failure ??= { reason })));
  }

  /** Waits for every batch in the window to settle, then throws the first failure, if any. */
  async settle(): Promise<void> {
    await Promise.all(this.waiting.splice(0));
    if (this.failure) throw this.failure.reason;
  }
}
