// A worker script for the WorkerPool tests: echoes, throws, or dies on request.
import { parentPort } from 'node:worker_threads';
import type { WorkerReply } from '../../shared/worker-pool.js';

parentPort!.on('message', (task: { op: 'echo' | 'throw' | 'exit' | 'hang'; value?: unknown }) => {
  let reply: WorkerReply;
  if (task.op === 'echo') reply = { ok: true, value: task.value };
  else if (task.op === 'throw') reply = { ok: false, code: 'E_DISK', message: 'asked to fail' };
  else if (task.op === 'exit') process.exit(3);
  else return; // 'hang': never answers
  parentPort!.postMessage(reply);
});
