import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { parseDurationMs, parseSizeBytes } from '../../shared/units.js';

describe('units', () => {
  it('parses durations of the CLI contract', () => {
    assert.equal(parseDurationMs('10s'), 10_000);
    assert.equal(parseDurationMs('5m'), 300_000);
    assert.equal(parseDurationMs('1h'), 3_600_000);
    assert.equal(parseDurationMs('7d'), 604_800_000);
    assert.equal(parseDurationMs('1.5s'), 1500);
    assert.throws(() => parseDurationMs('10'), /invalid duration/);
    assert.throws(() => parseDurationMs('ten seconds'), /invalid duration/);
  });

  it('parses sizes of the CLI contract', () => {
    assert.equal(parseSizeBytes('64K'), 65536);
    assert.equal(parseSizeBytes('1M'), 1 << 20);
    assert.equal(parseSizeBytes('1G'), 1 << 30);
    assert.equal(parseSizeBytes('4096'), 4096);
    assert.equal(parseSizeBytes('2MiB'), 2 << 20);
    assert.throws(() => parseSizeBytes('1X'), /invalid size/);
  });
});
