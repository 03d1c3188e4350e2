import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { setImmediate as turn } from 'node:timers/promises';
import { BatchWindow } from '../../agent/batch-window.js';

/** A batch the test settles by hand. */
function batch() {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => ((resolve = res), (reject = rej)));
  return { promise, resolve, reject };
}

describe('batch window', () => {
  it('has room for `limit` batches, and for the next one once the oldest settles', async () => {
    const window = new BatchWindow(2);
    const [a, b] = [batch(), batch()];
    await window.room();
    window.add(a.promise);
    await window.room();
    window.add(b.promise);
    let roomed = false;
    const room = window.room().then(() => (roomed = true));
    await turn();
    assert.equal(roomed, false, 'full while both are waiting');
    a.resolve();
    await room;
    assert.equal(roomed, true);
    b.resolve();
    await window.settle();
  });

  it('remembers the first failure, and settle waits for every batch before throwing it', async () => {
    const window = new BatchWindow(4);
    const [a, b, c] = [batch(), batch(), batch()];
    for (const x of [a, b, c]) window.add(x.promise);
    b.reject(new Error('receiver disk full'));
    await turn();
    assert.equal(window.failed, true);
    a.reject(new Error('connection closed'));
    let settled = false;
    const done = window.settle().then(
      () => assert.fail('settle must throw'),
      (err: Error) => {
        settled = true;
        assert.equal(err.message, 'receiver disk full');
      },
    );
    await turn();
    assert.equal(settled, false, 'c is still waiting');
    c.resolve();
    await done;
    assert.equal(settled, true);
  });
});
