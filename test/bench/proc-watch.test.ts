import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { cpus } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { readHostCpuTicks, stealShareSince } from '../../bench/proc-watch.js';

describe('bench: host CPU time', () => {
  it('counts every CPU of the machine in ticks of 1/100 s, and steal as a share of that', async () => {
    const before = readHostCpuTicks();
    const start = process.hrtime.bigint();
    await sleep(500);
    const after = readHostCpuTicks();
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    const ticks = after.total - before.total;
    const expected = 100 * seconds * cpus().length; // every CPU, busy or idle
    assert.ok(ticks > expected * 0.6 && ticks < expected * 1.6, `${ticks} ticks in ${seconds.toFixed(2)} s on ${cpus().length} CPUs`);
    assert.ok(after.steal >= before.steal && after.steal - before.steal <= ticks);
    const share = stealShareSince(before);
    assert.ok(share >= 0 && share <= 1, `steal share ${share}`);
  });
});
