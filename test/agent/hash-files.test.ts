// The agent's hash files across the XXH3-64 → XXH64 upgrade (SPEC §7), on a real state directory.
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentState, type DiskRecord } from '../../agent/state.js';
import { tempDir } from '../harness.js';

describe('hash files', () => {
  const dir = tempDir();
  after(() => rmSync(dir, { recursive: true, force: true }));
  const disk: DiskRecord = { path: '/dev/x', diskId: 7, sizeBytes: 4 * 65536, blockBytes: 65536, hasBaseline: true, baselinePointId: 3, watermark: 0 };
  const file = (name: string) => join(dir, 'hashes', name);

  it('a legacy pending file of a point committed behind the agent\'s back becomes the legacy baseline; the next commit removes both', () => {
    const state = AgentState.open(dir, { mustBeEnrolled: false });
    try {
      writeFileSync(file('7.shipped'), Buffer.alloc(32, 1));
      writeFileSync(file('7.pending'), Buffer.alloc(32, 2));
      assert.equal(state.legacyShippedPath(disk), file('7.shipped'));
      assert.equal(state.legacyShippedPath({ ...disk, hasBaseline: false }), null, 'no baseline: nothing to compare with');

      assert.equal(state.adoptPending(7), true);
      assert.deepEqual(readFileSync(file('7.shipped')), Buffer.alloc(32, 2), 'the committed point\'s hashes are the baseline now');
      assert.ok(!existsSync(file('7.pending')));

      state.startPending(disk, 4, 0n);
      state.promotePending(7);
      assert.deepEqual(readdirSync(join(dir, 'hashes')).sort(), ['7.shipped.xxh64']);
      assert.equal(state.legacyShippedPath(disk), null, 'upgraded');
      assert.equal(state.adoptPending(7), false, 'nothing pending');
    } finally {
      state.close();
    }
  });
});
