// Worker thread entry of the block pool (agent/block-pool.ts): runs scan and
// seal tasks with the vault's chunk keys, which it receives once at start.
// Data arrives as a view of shared memory (the disk read slab) or as a copy
// made for this task; envelopes are written into shared memory the task
// names, and the other results go back by transfer.
import { parentPort, workerData } from 'node:worker_threads';
import type { ChunkKeys } from '../shared/chunk-crypto.js';
import type { WorkerReply } from '../shared/worker-pool.js';
import { scanBlocks, sealBlocks } from './block-work.js';

export type BlockTask =
  | { op: 'scan'; data: Uint8Array; blockBytes: number; known: BigUint64Array | null; knownIsLegacy: boolean }
  | { op: 'seal'; data: Uint8Array; blockBytes: number; blocks: Uint32Array; ids: Uint8Array; output: Uint8Array; slots: Uint32Array };

const port = parentPort!;
const keys: ChunkKeys = { idKey: Buffer.from(workerData.idKey), encRoot: Buffer.from(workerData.encRoot) };

port.on('message', (task: BlockTask) => {
  let reply: WorkerReply;
  let transfer: ArrayBuffer[] = [];
  try {
    const data = Buffer.from(task.data.buffer, task.data.byteOffset, task.data.byteLength);
    if (task.op === 'scan') {
      const r = scanBlocks(keys, data, task.blockBytes, task.known, task.knownIsLegacy);
      transfer = [r.hashes.buffer, r.changed.buffer, r.zero.buffer, r.ids.buffer] as ArrayBuffer[];
      reply = { ok: true, value: r };
    } else if (task.op === 'seal') {
      const lengths = sealBlocks(keys, data, task.blockBytes, task.blocks, task.ids, task.output, task.slots);
      transfer = [lengths.buffer] as ArrayBuffer[];
      reply = { ok: true, value: lengths };
    } else {
      reply = { ok: false, code: 'E_INTERNAL', message: `unknown block task ${(task as { op: string }).op}` };
    }
  } catch (err) {
    const e = err as { code?: unknown; message?: string };
    reply = { ok: false, code: typeof e.code === 'string' && e.code.startsWith('E_') ? e.code : 'E_INTERNAL', message: `block worker: ${e.message ?? String(err)}` };
    transfer = [];
  }
  port.postMessage(reply, transfer);
});
