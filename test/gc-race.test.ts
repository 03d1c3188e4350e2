// A prune on the receiver may collect a chunk between the agent's upload (or a
// `chunks.query` that said it was stored) and the `blocks.put` that references
// it. The receiver answers that `blocks.put` with a retryable E_NOT_FOUND and
// the agent resumes its open point, shipping the chunk again, instead of
// failing the sync. The race is forced: a real `tidemark-receiver prune` runs
// beside `serve` right before the first `blocks.put` of the agent's real
// session goes out (the only thing this test changes is that timing); in the
// second test, before every blocks.put of a session but its first.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ReceiverConnection } from '../shared/connection.js';
import { createLogger } from '../shared/log.js';
import { AgentState } from '../agent/state.js';
import { syncOnce } from '../agent/sync.js';
import { Deployment, runJson } from './harness.js';
import { sha256File } from './fixtures.js';
import { vaultKeys } from './point-check.js';

const BLOCK = 64 * 1024;
const BLOCKS = 16;
/** Blocks in one of the agent's 4 MiB read batches. */
const BATCH_BLOCKS = (4 * 1024 * 1024) / BLOCK;

describe('garbage collection racing a sync', () => {
  let d: Deployment;
  const originalSend = ReceiverConnection.prototype.send;
  before(async () => {
    d = await Deployment.start();
  });
  after(async () => {
    ReceiverConnection.prototype.send = originalSend;
    await d?.close();
  });
  /** One run --once of `disk`, in this process (so that send() can be intercepted). */
  const sync = (state: AgentState, disk: string) => syncOnce({
    state, keys: vaultKeys(d.keyFile), diskPaths: [disk], blockBytes: BLOCK, bytesPerSecond: 0, json: false, log: createLogger('test', 'warn'),
  });

  it('chunks collected before their blocks.put are shipped again, the sync succeeds and its point restores', async () => {
    const state = AgentState.open(await d.enroll('gamma'), { mustBeEnrolled: true });
    const disk = join(d.root, 'gamma.img');
    writeFileSync(disk, randomBytes(BLOCKS * BLOCK));
    let chunksFreed: number | null = null;
    // Every request goes out through send().
    ReceiverConnection.prototype.send = async function (this: ReceiverConnection, type: any, body: any) {
      if (type === 'blocks.put' && chunksFreed === null) {
        // Nothing references the chunks just uploaded yet: this prune collects them.
        chunksFreed = (await runJson('receiver', ['prune', '--data', d.receiver.dataDir, '--json'])).chunksFreed as number;
      }
      return originalSend.call(this, type, body);
    } as typeof originalSend;
    try {
      const result = await sync(state, disk);
      assert.equal(chunksFreed, BLOCKS, 'the prune collected every chunk of the batch before its blocks.put');
      assert.equal(result.resumed, true, 'the second attempt resumed the open point');
      assert.equal(result.chunksUploaded, BLOCKS, 'the collected chunks were uploaded again');
      const [point] = await d.points('gamma');
      assert.equal(point.id, result.pointId);
      const out = join(d.root, 'gamma-restored.img');
      await d.restore('gamma', disk, point.id, out);
      assert.equal(await sha256File(out), await sha256File(disk));
    } finally {
      ReceiverConnection.prototype.send = originalSend;
      state.close();
    }
  });

  // A long initial sync sees several prunes (serve's schedule): each may cost the batch in flight.
  it('a sync that prunes interrupt again and again, gaining ground each time, finishes', async () => {
    const state = AgentState.open(await d.enroll('delta'), { mustBeEnrolled: true });
    const disk = join(d.root, 'delta.img');
    writeFileSync(disk, randomBytes(5 * BATCH_BLOCKS * BLOCK)); // five read batches
    const putsBySession = new Map<ReceiverConnection, number>();
    let prunes = 0;
    // In every session, a prune right before each blocks.put but the first: the session stages its
    // first batch, then loses the chunks of the others, as when prunes land all through a long sync.
    ReceiverConnection.prototype.send = async function (this: ReceiverConnection, type: any, body: any) {
      if (type === 'blocks.put') {
        const puts = (putsBySession.get(this) ?? 0) + 1;
        putsBySession.set(this, puts);
        if (puts > 1 && (await runJson('receiver', ['prune', '--data', d.receiver.dataDir, '--json'])).chunksFreed > 0) prunes++;
      }
      return originalSend.call(this, type, body);
    } as typeof originalSend;
    try {
      const result = await sync(state, disk);
      assert.ok(prunes >= 3, `prunes collected chunks of ${prunes} tries`);
      const out = join(d.root, 'delta-restored.img');
      await d.restore('delta', disk, result.pointId, out);
      assert.equal(await sha256File(out), await sha256File(disk));
    } finally {
      ReceiverConnection.prototype.send = originalSend;
      state.close();
    }
  });
});
