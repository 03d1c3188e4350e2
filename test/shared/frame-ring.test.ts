import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { FrameRing } from '../../shared/frame-ring.js';

/** A deterministic generator, so a failure repeats. */
function random(seed: number): () => number {
  return () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
}

describe('frame ring', () => {
  it('reuses its memory once the frames before are released, and gives fresh memory when full', () => {
    const ring = new FrameRing(100);
    const a = ring.take(40);
    const b = ring.take(40);
    assert.equal(b.buffer, a.buffer);
    assert.equal(b.byteOffset, a.byteOffset + 40);
    const full = ring.take(30); // 20 bytes left at the end, none at the start
    assert.notEqual(full.buffer, a.buffer);
    ring.release(full); // not the ring's: ignored
    ring.release(b); // released out of order: a still holds the start, so nothing is reusable yet
    assert.notEqual(ring.take(41).buffer, a.buffer);
    ring.release(a);
    const c = ring.take(80); // both released: from the start again
    assert.equal(c.buffer, a.buffer);
    assert.equal(c.byteOffset, a.byteOffset);
    assert.notEqual(ring.take(101).buffer, a.buffer, 'larger than the ring');
  });

  it('wraps to the start only into the room the oldest live frame has left, to the byte', () => {
    const ring = new FrameRing(100);
    const a = ring.take(30);
    const b = ring.take(50); // 30..80
    ring.release(a);
    const c = ring.take(20); // 80..100, the end exactly
    assert.equal(c.byteOffset - a.byteOffset, 80);
    assert.notEqual(ring.take(31).buffer, a.buffer, 'one byte more than the 30 before b');
    const d = ring.take(30); // wraps: 0..30
    assert.equal(d.buffer, a.buffer);
    assert.equal(d.byteOffset, a.byteOffset);
    assert.notEqual(ring.take(1).buffer, a.buffer, 'wrapped and full up to b');
    ring.release(b);
    ring.release(c);
    const e = ring.take(70); // b and c gone: 30..100
    assert.equal(e.byteOffset - a.byteOffset, 30);
  });

  it('never hands out a byte that an unreleased frame holds', () => {
    const next = random(7);
    const ring = new FrameRing(6000);
    let ringMemory: ArrayBufferLike | null = null;
    const live: Array<{ frame: Buffer; tag: number }> = [];
    let fromRing = 0;
    for (let step = 0; step < 20_000; step++) {
      if (live.length > 0 && (next() < 0.45 || live.length > 40)) {
        // Mostly in order, as a socket releases, sometimes not.
        const at = next() < 0.8 ? 0 : Math.floor(next() * live.length);
        const [{ frame, tag }] = live.splice(at, 1) as [{ frame: Buffer; tag: number }];
        assert.ok(frame.every((byte) => byte === tag), `frame overwritten before release at step ${step}`);
        ring.release(frame);
      } else {
        const frame = ring.take(1 + Math.floor(next() * 300));
        ringMemory ??= frame.buffer; // the first frame comes from the empty ring
        if (frame.buffer === ringMemory) fromRing++;
        const tag = step % 256;
        frame.fill(tag);
        live.push({ frame, tag });
      }
    }
    assert.ok(fromRing > 5000, `only ${fromRing} frames came from the ring`);
  });
});
