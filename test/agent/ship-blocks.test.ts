import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentState } from '../../agent/state.js';
import { BlockPool } from '../../agent/block-pool.js';
import { openSession, registerDisk, shipBlocks, type Totals } from '../../agent/sync.js';
import { VaultKeys } from '../../shared/chunk-crypto.js';
import { openKeyFile } from '../../shared/keyfile.js';
import { Deployment, PASSPHRASE } from '../harness.js';

const BLOCK = 64 * 1024;

describe('shipping a batch of blocks', () => {
  it('hands the batch back before the acks: the read slab and its envelopes can be reused at once, and the point is intact', async () => {
    const d = await Deployment.start();
    try {
      await d.enroll('h');
      const image = join(d.root, 'disk.img');
      const original = Buffer.concat([randomBytes(5 * BLOCK), Buffer.alloc(BLOCK), Buffer.alloc(2 * BLOCK, 'text')]);
      writeFileSync(image, original);

      const state = AgentState.open(d.stateDir('h'), { mustBeEnrolled: true });
      const keys = VaultKeys.fromMaster(openKeyFile(d.keyFile, PASSPHRASE));
      const pool = new BlockPool(keys, 2);
      const conn = await openSession(state, keys, 0);
      try {
        const { target } = await registerDisk(conn, state, image, BLOCK);
        const { pointId } = await conn.request('point.begin', { resume: null });
        const slab = BlockPool.sharedBuffer(original.length);
        original.copy(slab);
        const scanned = await pool.scan(slab, BLOCK, null);
        const totals: Totals = { bytesRead: 0, blocksChanged: 0, chunksUploaded: 0, bytesUploaded: 0, chunksDeduplicated: 0 };

        const shipment = await shipBlocks(conn, pool, pointId, target.record, (i) => i, slab, scanned, totals);
        assert.equal(totals.blocksChanged, 0, 'returned before the receiver staged the blocks');

        // The next batch takes the slab: new data, sealed into the same envelope memory.
        slab.fill(0xa5);
        await pool.seal(slab, BLOCK, [0, 1, 2, 3, 4], scanned.ids.slice(0, 5) as Buffer[]);

        await shipment.acked;
        assert.equal(totals.blocksChanged, 8);
        assert.equal(totals.chunksUploaded, 6, 'five random blocks and one text block; the zero block and the duplicate are not uploaded');
        await conn.request('point.commit', {
          pointId, timeMs: Date.now(), crashConsistent: true, disks: [{ diskId: target.record.diskId, changedBytes: shipment.changedBytes }],
        });

        const restored = join(d.root, 'restored.img');
        await d.restore('h', image, pointId, restored);
        assert.ok(readFileSync(restored).equals(original), 'the point holds the data as read, not what the slab held later');
      } finally {
        conn.close();
        await pool.close();
        state.close();
      }
    } finally {
      await d.close();
    }
  });
});
