import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_POLICY, decideRetention, resolvePolicy, type RetainedPoint } from '../../receiver/retention.js';

const NOW = Date.parse('2026-11-21T12:00:00Z'); // a Saturday
const MIN = 60_000;

/** A point every 10 minutes for 10 days, newest at NOW; point k is k*10 minutes old. */
function history(): RetainedPoint[] {
  return Array.from({ length: 1440 }, (_, k) => ({ id: 1440 - k, committedMs: NOW - k * 10 * MIN, diskIds: [1] }));
}
const idOfAge = (k: number) => 1440 - k;
const keptAges = (ids: Iterable<number>) => [...ids].map((id) => 1440 - id).sort((a, b) => a - b);

describe('retention policy', () => {
  it('default policy: every point of the last hour, hourly for 24 hours, daily for 7 days', () => {
    const { keep, drop } = decideRetention(history(), DEFAULT_POLICY, NOW);
    const within = [0, 1, 2, 3, 4, 5]; // strictly younger than 1 h
    const hourly = [0, 1, ...Array.from({ length: 22 }, (_, j) => 6 * (j + 2) - 5)]; // newest of each hour: 12:00, 11:50, 10:50, ...
    const daily = [0, 73, 217, 361, 505, 649, 793]; // 12:00 today, then 23:50 of each earlier day
    const expected = [...new Set([...within, ...hourly, ...daily])].sort((a, b) => a - b);
    assert.equal(expected.length, 33);
    assert.deepEqual(keptAges(keep.keys()), expected);
    assert.equal(drop.length, 1440 - 33);
    assert.deepEqual(keep.get(idOfAge(0)), ['newest', 'within', 'hourly', 'daily']);
    assert.deepEqual(keep.get(idOfAge(73)), ['hourly', 'daily']);
    assert.deepEqual(keep.get(idOfAge(793)), ['daily']);
  });

  it('weekly buckets start on Monday (UTC)', () => {
    const { keep } = decideRetention(history(), { keepWithinMs: 0, keepHourly: 0, keepDaily: 0, keepWeekly: 3 }, NOW);
    // NOW is Saturday 12:00, so this week began 5.5 days (792 steps) ago: its newest point is NOW; last week's
    // newest is Sunday 23:50 (age 793); the 10 days of history reach no further week.
    assert.deepEqual(keptAges(keep.keys()), [0, 793]);
  });

  it('always keeps the newest point, even with an empty policy', () => {
    const { keep, drop } = decideRetention(history(), { keepWithinMs: 0, keepHourly: 0, keepDaily: 0, keepWeekly: 0 }, NOW);
    assert.deepEqual(keptAges(keep.keys()), [0]);
    assert.equal(drop.length, 1439);
    assert.deepEqual(decideRetention([], DEFAULT_POLICY, NOW), { keep: new Map(), drop: [] });
  });

  it('keeps the last point of each disk, and the last committed point even when its clock time is older', () => {
    const points = [
      { id: 1, committedMs: NOW - 72 * 60 * MIN, diskIds: [7] }, // disk 7's only point
      { id: 2, committedMs: NOW - 10 * MIN, diskIds: [8] },
      { id: 3, committedMs: NOW - 20 * MIN, diskIds: [8] }, // committed after the clock was stepped back
    ];
    const { keep, drop } = decideRetention(points, { keepWithinMs: 0, keepHourly: 0, keepDaily: 0, keepWeekly: 0 }, NOW);
    assert.deepEqual([...keep], [[3, ['newest']], [1, ['last of a disk']]]);
    assert.deepEqual(drop, [2]);
  });

  it('a flood of new points cannot evict the points the policy keeps', () => {
    const before = decideRetention(history(), DEFAULT_POLICY, NOW);
    const flood = Array.from({ length: 5000 }, (_, i) => ({ id: 2000 + i, committedMs: NOW + 1 + i, diskIds: [1] }));
    const after = decideRetention([...history(), ...flood], DEFAULT_POLICY, NOW + 6000);
    for (const id of before.keep.keys()) {
      if (id === idOfAge(0)) continue; // the newest of the hour bucket 12:00 is now a flood point
      assert.ok(after.keep.has(id), `point ${id} (age ${1440 - id}) still kept`);
    }
    for (const p of flood) assert.ok(after.keep.has(p.id), 'points younger than an hour are kept');
  });

  it('layers config and flags over the defaults', () => {
    assert.deepEqual(resolvePolicy({ keepWithin: '2h', keepDaily: 30 }, { keepDaily: 3 }), { keepWithinMs: 7_200_000, keepHourly: 24, keepDaily: 3, keepWeekly: 0 });
  });
});
