// A prune on the receiver may collect a chunk between the agent's upload (or a
// `chunks.query` that said it was stored) and the `blocks.put` that references
// it. The agent must ship the batch again, not fail the cycle. The race is
// forced here: a real `tidemark-receiver prune` runs beside `serve` right
// before the first `blocks.put` goes out, on the agent's real session.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ReceiverConnection } from '../shared/connection.js';
import { AgentState } from '../agent/state.js';
import { openSession, registerDisk, shipBlocks, type Totals } from '../agent/sync.js';
import { Deployment, runJson } from './harness.js';
import { sha256File } from './fixtures.js';
import { vaultKeys } from './point-check.js';

const BLOCK = 64 * 1024;
const BLOCKS = 16;

describe('garbage collection racing a sync', () => {
  let d: Deployment;
  before(async () => {
    d = await Deployment.start();
  });
  after(() => d?.close());

  it('chunks collected before their blocks.put are uploaded again and the point restores', async () => {
    const state = AgentState.open(await d.enroll('gamma'), { mustBeEnrolled: true });
    const keys = vaultKeys(d.keyFile);
    const disk = join(d.root, 'gamma.img');
    const data = randomBytes(BLOCKS * BLOCK);
    writeFileSync(disk, data);
    const conn = await openSession(state, keys, 0);
    try {
      const { target } = await registerDisk(conn, state, disk, BLOCK);
      const { pointId } = await conn.request('point.begin', { resume: null });
      let prunes = 0;
      let chunksFreed = 0;
      const racing = {
        request: async (type: string, body: Record<string, unknown>) => {
          if (type === 'blocks.put' && prunes === 0) {
            prunes++;
            // Nothing references the chunks just uploaded yet: this prune collects them.
            chunksFreed = (await runJson('receiver', ['prune', '--data', d.receiver.dataDir, '--json'])).chunksFreed;
          }
          return conn.request(type as never, body as never);
        },
      } as unknown as ReceiverConnection;
      const totals: Totals = { bytesRead: 0, blocksChanged: 0, chunksUploaded: 0, bytesUploaded: 0, chunksDeduplicated: 0 };
      const blocks = Array.from({ length: BLOCKS }, (_, i) => i);
      const changedBytes = await shipBlocks(racing, keys, pointId, target.record, 0, data, blocks, totals);
      assert.equal(chunksFreed, BLOCKS, 'the prune collected every chunk of the batch before its blocks.put');
      assert.equal(totals.chunksUploaded, 2 * BLOCKS, 'the batch was queried and uploaded again');
      assert.equal(totals.blocksChanged, BLOCKS);
      assert.equal(changedBytes, BLOCKS * BLOCK);
      await conn.request('point.commit', { pointId, timeMs: Date.now(), crashConsistent: true, disks: [{ diskId: target.record.diskId, changedBytes }] });
    } finally {
      conn.close();
      state.close();
    }
    const [point] = await d.points('gamma');
    const out = join(d.root, 'gamma-restored.img');
    await d.restore('gamma', disk, point.id, out);
    assert.equal(await sha256File(out), await sha256File(disk));
  });
});
