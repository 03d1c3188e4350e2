// Crash safety (issue 6, promise 4): SIGKILL the receiver at random moments
// during syncs, the receiver while prune runs in it and beside it, and the
// agent during syncs — at least 20 kills each, moments from a seeded PRNG.
// The image changes before every cycle and a copy is kept per cycle. After
// every kill: each listed point is a complete image of a cycle that built it
// (never a mix: no partial point), and every point acknowledged to the agent
// (`{"event":"point"}`) is listed. At the end every acknowledged point still
// rebuilds byte-identical, a few through the real `tidemark-restore`, the
// key-less verify is clean, and a run after the last kill completes.
//
// TIDEMARK_TEST_DEBUG=1 prints each cycle (delay, exit, acknowledged point).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import type { PointInfo } from '../shared/protocol.js';
import { Deployment, collect, lastEvent, runCli, spawnCli, type CliResult } from './harness.js';
import { changeBlocks, makePrng, sha256File, writeMixedImage } from './fixtures.js';
import { listPoints, pointSha256, restoreSession, vaultKeys } from './point-check.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const IMAGE_BYTES = 8 * MiB;
/** Blocks rewritten before each cycle (of 128). */
const CHANGED_PER_CYCLE = 40;
const KILLS = 22;
/** Receiver kills that must land while a `prune` process is running. */
const KILLS_DURING_PRUNE = 20;
const debug = (...args: unknown[]) => process.env.TIDEMARK_TEST_DEBUG && console.log(...args);

interface Cycle {
  index: number;
  sha: string;
  copy: string;
  /** The agent's open point before and after the cycle (state.db), to know which cycles built a point. */
  openBefore: number | null;
  openAfter: number | null;
  acked: number | null;
}

function openPointOf(stateDir: string): number | null {
  const db = new Database(join(stateDir, 'state.db'), { readonly: true });
  try {
    const value = db.prepare(`SELECT value FROM config WHERE key = 'openPointId'`).pluck().get() as string | undefined;
    return value ? Number(value) : null;
  } finally {
    db.close();
  }
}

/**
 * One host's history under crashes: the cycles run, which point each acknowledged,
 * and the checks that every listed point is whole.
 */
class History {
  readonly cycles: Cycle[] = [];
  /** Point id → the cycle after which it was first listed. */
  private readonly firstListed = new Map<number, number>();
  /** Point id → sha256 last checked. */
  readonly verified = new Map<number, string>();
  private readonly disk: string;

  constructor(
    private readonly d: Deployment,
    private readonly keys: VaultKeys,
    readonly host: string,
    private readonly stateDir: string,
  ) {
    this.disk = join(d.root, `${host}.img`);
  }

  async init(seed: number): Promise<void> {
    await writeMixedImage(this.disk, IMAGE_BYTES, seed);
  }

  /** Changes the image, keeps a copy, starts `run --once`. */
  async startCycle(seed: number): Promise<{ cycle: Cycle; result: Promise<CliResult>; pid: number; kill: () => void }> {
    const index = this.cycles.length;
    if (index > 0) await changeBlocks(this.disk, BLOCK, CHANGED_PER_CYCLE, seed);
    const copy = join(this.d.root, `${this.host}-cycle-${index}.img`);
    copyFileSync(this.disk, copy);
    const cycle: Cycle = { index, sha: await sha256File(copy), copy, openBefore: openPointOf(this.stateDir), openAfter: null, acked: null };
    this.cycles.push(cycle);
    const child = spawnCli('agent', ['run', '--once', '--json', '--state', this.stateDir, '--disk', this.disk]);
    return { cycle, result: collect(child), pid: child.pid!, kill: () => child.kill('SIGKILL') };
  }

  /** Records how the cycle's agent ended; `allowed` exit codes besides 0 and a SIGKILL of the agent. */
  finishCycle(cycle: Cycle, r: CliResult, allowed: Array<{ code: number; stderr?: RegExp }>): void {
    cycle.openAfter = openPointOf(this.stateDir);
    if (r.code === 0) cycle.acked = lastEvent(r.stdout, 'point').pointId as number;
    const ok = r.code === 0 || r.signal === 'SIGKILL' || allowed.some((a) => a.code === r.code && (!a.stderr || a.stderr.test(r.stderr)));
    assert.ok(ok, `${this.host} cycle ${cycle.index}: agent exited ${r.code ?? r.signal}: ${r.stderr.trim()}`);
  }

  /** The image hashes a listed point may have: those of every cycle that had it open, began it or committed it. */
  private candidates(pointId: number): Set<string> {
    const first = this.firstListed.get(pointId)!;
    return new Set(this.cycles
      .filter((c) => c.acked === pointId || c.openBefore === pointId || c.openAfter === pointId || c.index === first)
      .map((c) => c.sha));
  }

  /**
   * After a kill: every listed point rebuilds to a whole image of a cycle that built it
   * (`recheck`: all of them again, else only new ones), and acknowledged points are listed
   * unless retention may have dropped them (`retained`: false).
   */
  async check(when: string, opts: { recheck?: boolean; retained?: boolean } = {}): Promise<PointInfo[]> {
    const conn = await restoreSession(this.d, this.keys);
    try {
      const points = await listPoints(conn, this.host);
      const lastCycle = this.cycles.length - 1;
      for (const p of points) {
        if (!this.firstListed.has(p.id)) this.firstListed.set(p.id, lastCycle);
        if (this.verified.has(p.id) && !opts.recheck) continue;
        const sha = await pointSha256(conn, this.keys, p);
        const acked = this.cycles.find((c) => c.acked === p.id);
        if (acked) {
          assert.equal(sha, acked.sha, `${when}: acknowledged point ${p.id} (cycle ${acked.index}) does not rebuild to its copy`);
        } else {
          assert.ok(this.candidates(p.id).has(sha), `${when}: listed point ${p.id} is not a whole image of any cycle that built it (a partial point?)`);
        }
        this.verified.set(p.id, sha);
      }
      const listed = new Set(points.map((p) => p.id));
      const acked = this.cycles.flatMap((c) => (c.acked === null ? [] : [c.acked]));
      if (opts.retained !== false) {
        for (const id of acked) assert.ok(listed.has(id), `${when}: acknowledged point ${id} is not listed`);
      } else if (acked.length > 0) {
        // Retention may drop an acknowledged point, never the newest one.
        const newest = Math.max(...acked);
        assert.ok(points.some((p) => p.id >= newest), `${when}: the newest acknowledged point ${newest} (or a newer one) is not listed`);
      }
      return points;
    } finally {
      conn.close();
    }
  }

  /** The real restore CLI for a few acknowledged points: byte-identical to their copies. */
  async restoreWithCli(pointIds: number[]): Promise<void> {
    for (const id of pointIds) {
      const cycle = this.cycles.find((c) => c.acked === id)!;
      const out = join(this.d.root, `${this.host}-restored-${id}.img`);
      await this.d.restore(this.host, this.disk, id, out);
      assert.equal(await sha256File(out), cycle.sha, `tidemark-restore of point ${id} equals the copy of cycle ${cycle.index}`);
    }
  }

  /**
   * An initial sync and an incremental cycle, undisturbed: acknowledged points to protect, and
   * the length of an incremental cycle on this machine now, so that kills spread over it on a slow (or busy)
   * machine as on a fast one.
   */
  async warmUp(): Promise<number> {
    let cycleMs = 0;
    for (const seed of [8998, 8999]) {
      const startedMs = Date.now();
      const run = await this.startCycle(seed);
      this.finishCycle(run.cycle, await run.result, []);
      cycleMs = Date.now() - startedMs; // the last one: an incremental cycle, like those killed
    }
    return cycleMs;
  }

  ackedPoints(): number[] {
    return this.cycles.flatMap((c) => (c.acked === null ? [] : [c.acked]));
  }
}

async function verifyClean(d: Deployment): Promise<void> {
  const verify = await runCli('receiver', ['verify', '--data', d.receiver.dataDir, '--json']);
  assert.equal(verify.code, 0, `tidemark-receiver verify after the kills: ${verify.stdout.slice(0, 2000)} ${verify.stderr}`);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('crash safety: the receiver SIGKILLed during syncs', () => {
  let d: Deployment;
  let h: History;
  before(async () => {
    d = await Deployment.start();
    const state = await d.enroll('kilo');
    h = new History(d, vaultKeys(d.keyFile), 'kilo', state);
    await h.init(601);
  });
  after(() => d?.close());

  it(`${KILLS} receiver kills at random moments: no partial point, every acknowledged point intact`, async () => {
    const random = makePrng(6001);
    const cycleMs = await h.warmUp();
    let kills = 0;
    let interrupted = 0;
    for (let i = 0; kills < KILLS; i++) {
      const run = await h.startCycle(7000 + i);
      // Most kills land inside the sync (start-up, key derivation, reads, uploads, commit), some after it.
      const delayMs = Math.round(cycleMs * (0.15 + (random() % 1000) / 800)); // 0.15 to 1.4 cycles
      const crash: { done?: Promise<void> } = {};
      const timer = setTimeout(() => (crash.done = d.receiver.restart('SIGKILL')), delayMs);
      const r = await run.result;
      clearTimeout(timer);
      await (crash.done ?? d.receiver.restart('SIGKILL')); // the cycle was quicker: killed between cycles
      kills++;
      if (r.code !== 0) interrupted++;
      h.finishCycle(run.cycle, r, [{ code: 4, stderr: /unreachable|closed/ }]);
      debug('receiver kill', kills, { delayMs, exit: r.code, acked: run.cycle.acked });
      await h.check(`after receiver kill ${kills} (${delayMs} ms into cycle ${run.cycle.index})`);
    }
    assert.ok(interrupted >= KILLS / 3, `at least a third of the kills interrupted a sync (${interrupted} of ${kills})`);
    // The next run completes, and everything acknowledged is still whole.
    const last = await h.startCycle(7999);
    h.finishCycle(last.cycle, await last.result, []);
    assert.notEqual(last.cycle.acked, null, 'a run after the last kill commits a point');
    await h.check('at the end', { recheck: true });
    assert.ok(interrupted < kills, 'some cycles between the kills completed');
    const acked = h.ackedPoints();
    await h.restoreWithCli([acked[0]!, acked.at(-1)!]);
    await verifyClean(d);
  });
});

describe('crash safety: the receiver SIGKILLed while prune runs in it and beside it', () => {
  let d: Deployment;
  let h: History;
  before(async () => {
    d = await Deployment.start();
    const state = await d.enroll('lima');
    h = new History(d, vaultKeys(d.keyFile), 'lima', state);
    await h.init(602);
    // Keep only the last 2 s and the newest point; serve prunes every 500 ms: points are
    // dropped and folded into the ones kept, chunks collected, packs compacted, all the time.
    writeFileSync(join(d.receiver.dataDir, 'config.json'),
      JSON.stringify({ retention: { keepWithin: '2s', keepHourly: 0, keepDaily: 0, keepWeekly: 0 }, pruneInterval: '500ms' }));
    await d.receiver.restart();
  });
  after(() => d?.close());

  it(`receiver kills until ${KILLS_DURING_PRUNE} land while a prune process runs: kept points stay whole, no partial point`, async () => {
    const random = makePrng(6002);
    let kills = 0;
    let duringPrune = 0;
    // A prune that finishes before its kill still makes a kill to check; go on until enough land inside one.
    for (let i = 0; duringPrune < KILLS_DURING_PRUNE && kills < 2 * KILLS; i++) {
      const run = await h.startCycle(8000 + i);
      // Every fourth kill leaves pruning to serve alone, and comes late enough (its timer fires every
      // 500 ms; the previous point is then over 2 s old and no longer the newest) that serve's own
      // prune has points to drop. Otherwise the prune beside it, started at once, drops them first.
      const serveAlone = i % 4 === 3;
      // Mostly the cycle completes (a point to keep or fold); every third kill lands in the sync too.
      const duringSync = !serveAlone && random() % 3 === 0;
      let r: CliResult | undefined = duringSync ? undefined : await run.result;
      if (duringSync) await sleep(300 + (random() % 600));
      // A prune beside serve; sometimes it is killed too.
      const pruneChild = serveAlone ? null : spawnCli('receiver', ['prune', '--data', d.receiver.dataDir, '--json']);
      const pruned = pruneChild && collect(pruneChild);
      // Start-up takes 0.1–0.3 s and a prune as long again, by machine: spread the kills over both.
      const delayMs = serveAlone ? 1500 + (random() % 1000) : 50 + (random() % 400);
      const killPrune = random() % 2 === 0;
      await sleep(delayMs);
      if (pruneChild && pruneChild.exitCode === null) duringPrune++;
      const crashed = d.receiver.restart('SIGKILL');
      if (pruneChild && killPrune) setTimeout(() => pruneChild.kill('SIGKILL'), random() % 200);
      kills++;
      const p = pruned && await pruned;
      if (p) assert.ok(p.code === 0 || p.signal === 'SIGKILL', `prune beside serve exited ${p.code ?? p.signal}: ${p.stderr.trim()}`);
      r ??= await run.result;
      await crashed;
      // A prune that collects a chunk between the agent's query and its blocks.put is retried by the agent (exit 0).
      h.finishCycle(run.cycle, r, [{ code: 4, stderr: /unreachable|closed/ }]);
      debug('receiver kill during prune', kills, { serveAlone, duringSync, delayMs, prune: p ? p.signal ?? p.code : null, exit: r.code, acked: run.cycle.acked });
      await h.check(`after receiver kill ${kills} during prune (cycle ${run.cycle.index})`, { recheck: true, retained: false });
    }
    assert.ok(duringPrune >= KILLS_DURING_PRUNE, `${KILLS_DURING_PRUNE} kills should have landed while a prune process ran, ${duringPrune} of ${kills} did`);
    const servePrunes = d.receiver.log.split('\n').filter((l) => l.includes('"msg":"prune finished"')).map((l) => JSON.parse(l) as { pointsDropped: number });
    debug({ servePrunes: servePrunes.length, servePrunesThatDropped: servePrunes.filter((p) => p.pointsDropped > 0).length });
    assert.ok(servePrunes.some((p) => p.pointsDropped > 0), 'serve\'s scheduled prune dropped points between the kills');
    const last = await h.startCycle(8999);
    h.finishCycle(last.cycle, await last.result, []);
    assert.notEqual(last.cycle.acked, null, 'a run after the last kill commits a point');
    const final = await runCli('receiver', ['prune', '--data', d.receiver.dataDir, '--json']);
    assert.equal(final.code, 0, final.stderr);
    const points = await h.check('at the end', { recheck: true, retained: false });
    assert.ok(points.some((p) => p.id === last.cycle.acked), 'the newest point is kept');
    assert.ok(h.ackedPoints().length >= 3, `several points were acknowledged (${h.ackedPoints().length})`);
    await h.restoreWithCli([last.cycle.acked!]);
    await verifyClean(d);
  });
});

describe('crash safety: the agent SIGKILLed during syncs', () => {
  let d: Deployment;
  let h: History;
  before(async () => {
    d = await Deployment.start();
    const state = await d.enroll('mike');
    h = new History(d, vaultKeys(d.keyFile), 'mike', state);
    await h.init(603);
  });
  after(() => d?.close());

  it(`${KILLS} agent kills at random moments: acknowledged points intact, the next run completes`, async () => {
    const random = makePrng(6003);
    const cycleMs = await h.warmUp();
    let kills = 0;
    let completed = 0;
    for (let i = 0; kills < KILLS; i++) {
      const run = await h.startCycle(9000 + i);
      const delayMs = Math.round(cycleMs * (0.15 + (random() % 1000) / 800)); // 0.15 to 1.4 cycles
      const timer = setTimeout(run.kill, delayMs);
      const r = await run.result;
      clearTimeout(timer);
      if (r.signal === 'SIGKILL') kills++;
      else completed++;
      h.finishCycle(run.cycle, r, []);
      debug('agent kill', kills, { delayMs, exit: r.code ?? r.signal, acked: run.cycle.acked });
      await h.check(`after agent cycle ${run.cycle.index} (${r.signal ? `killed at ${delayMs} ms` : 'completed'})`);
    }
    const last = await h.startCycle(9999);
    h.finishCycle(last.cycle, await last.result, []);
    assert.notEqual(last.cycle.acked, null, 'the run after the last kill completes and commits a point');
    await h.check('at the end', { recheck: true });
    assert.ok(completed > 0, 'some cycles between the kills completed and committed');
    const acked = h.ackedPoints();
    await h.restoreWithCli([acked[0]!, acked.at(-1)!]);
    await verifyClean(d);
  });
});
