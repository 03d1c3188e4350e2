// A fixed set of worker threads running one script, each doing one task at a
// time. CPU-heavy per-block work (hash, MAC, lz4, AES-GCM) runs here so every
// core works while the main thread keeps reading the disk and the socket.
//
// Failure rules: a task that throws rejects only that task (the worker is
// still sound); a worker that dies (crash, exit) poisons the pool: every
// queued and running task is rejected and later runs fail at once, because
// the caller cannot know what the dead worker had half done. close() ends
// every thread on every path so the process can exit.
import { Worker, type Transferable } from 'node:worker_threads';
import { TidemarkError } from './errors.js';

/**
 * Workers allocate little on their heaps but hand large buffers around; a small
 * young generation is scavenged often, which frees those buffers promptly
 * (the default let garbage grow the agent by tens of MiB per worker).
 */
const WORKER_YOUNG_GENERATION_MB = 2;

interface Task {
  message: unknown;
  transfer: Transferable[];
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

interface Slot {
  worker: Worker;
  task: Task | null;
}

/** What a worker script posts back for each task. */
export type WorkerReply = { ok: true; value: unknown } | { ok: false; code?: string; message: string };

export class WorkerPool {
  private readonly slots: Slot[] = [];
  private readonly queue: Task[] = [];
  private failure: Error | null = null;
  private closed = false;

  constructor(script: URL, size: number, workerData: unknown) {
    if (!Number.isInteger(size) || size < 1) throw new TidemarkError('E_USAGE', `worker pool size must be a positive integer (got ${size})`);
    try {
      for (let i = 0; i < size; i++) this.slots.push(this.spawn(script, workerData));
    } catch (err) {
      void this.close();
      throw err;
    }
  }

  get size(): number {
    return this.slots.length;
  }

  /** Runs one task on the next free worker; `transfer` lists buffers moved (not copied) to it. */
  run<T>(message: unknown, transfer: Transferable[] = []): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new TidemarkError('E_STATE', 'worker pool is closed'));
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ message, transfer, resolve: resolve as (v: unknown) => void, reject });
      this.dispatch();
    });
  }

  /** Ends every worker; tasks not finished are rejected. Safe to call more than once. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.failAll(new TidemarkError('E_STATE', 'worker pool closed before the task finished'));
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }

  private spawn(script: URL, workerData: unknown): Slot {
    const slot: Slot = { worker: new Worker(script, { workerData, resourceLimits: { maxYoungGenerationSizeMb: WORKER_YOUNG_GENERATION_MB } }), task: null };
    slot.worker.on('message', (reply: WorkerReply) => {
      const task = slot.task;
      slot.task = null;
      if (task) {
        if (reply.ok) task.resolve(reply.value);
        else task.reject(new TidemarkError((reply.code as never) ?? 'E_INTERNAL', reply.message));
      }
      this.dispatch();
    });
    slot.worker.on('error', (err) => this.poison(new TidemarkError('E_INTERNAL', `worker thread failed: ${err.message}`, { cause: err })));
    slot.worker.on('exit', (code) => {
      if (!this.closed) this.poison(new TidemarkError('E_INTERNAL', `worker thread exited unexpectedly (code ${code})`));
    });
    return slot;
  }

  private dispatch(): void {
    if (this.failure || this.closed) return;
    for (const slot of this.slots) {
      if (slot.task || this.queue.length === 0) continue;
      const task = this.queue.shift()!;
      slot.task = task;
      try {
        slot.worker.postMessage(task.message, task.transfer);
      } catch (err) {
        slot.task = null;
        task.reject(err as Error);
      }
    }
  }

  private poison(err: Error): void {
    if (this.failure || this.closed) return;
    this.failure = err;
    this.failAll(err);
    // The other workers are healthy but the pool will take no more work: end them now.
    void this.close();
  }

  private failAll(err: Error): void {
    for (const slot of this.slots) {
      slot.task?.reject(err);
      slot.task = null;
    }
    for (const task of this.queue.splice(0)) task.reject(err);
  }
}
