// Retention and garbage collection with a real receiver: points are made by
// real syncs, then back-dated in the catalog to stand for days of history.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { chownSync, copyFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import Database from 'better-sqlite3';
import { destination, pino } from 'pino';
import { Catalog } from '../receiver/catalog.js';
import { openDataDir } from '../receiver/data-dir.js';
import { prune, type PruneReport } from '../receiver/prune.js';
import { Deployment, collect, runCli, runJson, spawnCli } from './harness.js';
import { changeBlocks, makePrng, sha256File, writeMixedImage } from './fixtures.js';
import { restoreSession, vaultKeys } from './point-check.js';

const MiB = 1024 * 1024;
const HOUR = 3_600_000;
const NOW = Date.parse('2026-11-21T12:00:00Z');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Makes `ages.length` points, rewriting most blocks each time, and back-dates point i to NOW - ages[i]. */
async function makeHistory(d: Deployment, host: string, ages: number[]) {
  const disk = join(d.root, `${host}.img`);
  await writeMixedImage(disk, 8 * MiB, 21);
  const points: Array<{ id: number; image: string }> = [];
  for (const [i] of ages.entries()) {
    if (i > 0) await changeBlocks(disk, 64 * 1024, 100, 100 + i);
    const { pointId } = await d.syncOnce(host, [disk]);
    const image = join(d.root, `${host}-point-${pointId}.img`);
    copyFileSync(disk, image);
    points.push({ id: pointId, image });
    await sleep(2500); // the receiver seals an idle pack: each point's chunks land in a pack of their own
  }
  const db = new Database(join(d.receiver.dataDir, 'catalog.db'));
  points.forEach((p, i) => db.prepare('UPDATE point SET committed_ms = ? WHERE id = ?').run(NOW - ages[i]!, p.id));
  db.close();
  return { disk, points };
}

async function assertRestores(d: Deployment, host: string, disk: string, point: { id: number; image: string }) {
  const out = join(d.root, `check-${point.id}-${Date.now()}.img`);
  await d.restore(host, disk, point.id, out);
  assert.equal(await sha256File(out), await sha256File(point.image), `point ${point.id} restores byte-identical`);
}

const policy = ['--keep-within', '1h', '--keep-hourly', '0', '--keep-daily', '2', '--keep-weekly', '0', '--now', new Date(NOW).toISOString()];

describe('prune', () => {
  let d: Deployment;
  before(async () => {
    d = await Deployment.start();
    await d.enroll('kappa');
  });
  after(() => d?.close());

  it('drops what the policy does not keep, folds what kept points need, and frees space', async () => {
    // 3 days, 2 days 1 hour, 2 days, 30 minutes and 0 old: keep within 1 h (the last two) and
    // the newest of the last two days with points (today's newest, and the 2-day-old one).
    const { disk, points } = await makeHistory(d, 'kappa', [72 * HOUR, 49 * HOUR, 48 * HOUR, HOUR / 2, 0]);
    const [p1, p2, p3, p4, p5] = points as [typeof points[0], typeof points[0], typeof points[0], typeof points[0], typeof points[0]];

    const plan = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, ...policy, '--dry-run']);
    assert.deepEqual(plan.hosts[0].dropped.map((p: any) => p.id), [p1.id, p2.id]);
    assert.deepEqual(plan.hosts[0].kept.map((p: any) => p.id), [p3.id, p4.id, p5.id]);
    assert.ok(plan.bytesFreed > 0);
    assert.equal((await d.points('kappa')).length, 5, 'a dry run changes nothing');
    const status = await d.receiver.status();
    assert.equal(status.hosts[0].pointSpace.length, 5);

    // The packs belong to the service's user (here: nobody); the prune runs as root, by hand.
    const asRoot = process.getuid?.() === 0;
    const packFiles = () => readdirSync(join(d.receiver.dataDir, 'packs'), { recursive: true, encoding: 'utf8' }).filter((f) => f.endsWith('.pack'))
      .map((f) => join(d.receiver.dataDir, 'packs', f));
    if (asRoot) for (const f of packFiles()) chownSync(f, 65534, 65534);
    const report = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, ...policy]);
    assert.equal(report.pointsDropped, 2);
    if (asRoot) for (const f of packFiles()) assert.equal(statSync(f).uid, 65534, `${f} keeps the packs' owner`);
    assert.equal(report.bytesFreed, plan.bytesFreed, 'the dry run predicted the real prune');
    assert.ok(report.packsCompacted >= 1, 'the pack of the dropped initial sync was compacted');
    assert.ok(report.packBytesAfter < report.packBytesBefore, `pack bytes shrink (${report.packBytesBefore} → ${report.packBytesAfter})`);
    const after = await d.receiver.status();
    assert.ok(after.storedChunkBytes < status.storedChunkBytes);
    assert.deepEqual((await d.points('kappa')).map((p) => p.id), [p3.id, p4.id, p5.id]);
    for (const p of [p3, p4, p5]) await assertRestores(d, 'kappa', disk, p);

    const again = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, ...policy]);
    assert.equal(again.pointsDropped, 0, 'prune is idempotent');
    assert.equal(again.chunksFreed, 0);
  });

  // A point lists the disks of its cycle (run --disk a, later --disk b): the point a dropped
  // point folds into may not list all of its disks. And the receiver's clock may step back,
  // so that the last point committed is not the newest by time.
  it('keeps every disk\'s history whichever disks the kept points list, and survives a clock stepped back', async () => {
    await d.enroll('nu');
    const [a, b] = [join(d.root, 'nu-a.img'), join(d.root, 'nu-b.img')];
    await writeMixedImage(a, 4 * MiB, 41);
    await writeMixedImage(b, 4 * MiB, 42);
    const images = new Map<string, string>(); // "point:disk" → a copy of the disk at that point
    const sync = async (disks: string[], seed: number) => {
      for (const disk of disks) await changeBlocks(disk, 64 * 1024, 3, seed);
      const { pointId } = await d.syncOnce('nu', disks);
      for (const disk of disks) {
        copyFileSync(disk, `${disk}-${pointId}`);
        images.set(`${pointId}:${disk}`, `${disk}-${pointId}`);
      }
      return pointId as number;
    };
    const p1 = await sync([a, b], 1);
    const p2 = await sync([a], 2);
    const p3 = await sync([b], 3);
    const p4 = await sync([a], 4);
    const p5 = await sync([a], 5);
    // Ages: p5 was committed last, after the receiver's clock was stepped back by two days.
    const db = new Database(join(d.receiver.dataDir, 'catalog.db'));
    for (const [id, age] of [[p1, 72], [p2, 49], [p3, 48], [p4, 0], [p5, 50]] as const) db.prepare('UPDATE point SET committed_ms = ? WHERE id = ?').run(NOW - age * HOUR, id);
    db.close();

    const report = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, ...policy]);
    const host = report.hosts.find((h: any) => h.host === 'nu');
    assert.deepEqual(host.dropped.map((p: any) => p.id), [p1, p2]);
    assert.deepEqual(host.kept.map((p: any) => [p.id, p.reasons]), [[p3, ['last of a disk', 'daily']], [p4, ['within', 'daily']], [p5, ['newest']]]);
    // p1's versions of b went to p3, of a to p4 (p3 lists only b): both disks restore whole.
    for (const [id, disk] of [[p3, b], [p4, a], [p5, a]] as const) {
      await assertRestores(d, 'nu', disk, { id, image: images.get(`${id}:${disk}`)! });
    }
    const verify = await runJson('receiver', ['verify', '--data', d.receiver.dataDir]);
    assert.equal(verify.ok, true, JSON.stringify(verify.damaged));
  });

  it('skips a pack that another prune compacted since it looked (serve\'s schedule beside a prune by hand)', async () => {
    await d.enroll('lambda');
    const { disk, points } = await makeHistory(d, 'lambda', [72 * HOUR, 49 * HOUR, 48 * HOUR, HOUR / 2, 0]);
    const dir = openDataDir(d.receiver.dataDir);
    const retention = { keepWithinMs: HOUR, keepHourly: 0, keepDaily: 2, keepWeekly: 0 };
    const first = Catalog.open(dir.catalogPath);
    const second = Catalog.open(dir.catalogPath);
    try {
      // As the first prune finishes its first pack, the second runs whole: it compacts the
      // packs the first one listed and has yet to reach, and removes their files.
      let other: PruneReport | undefined;
      const log = pino({ hooks: { logMethod(args, method) {
        if (args[1] === 'pack compacted' && !other) other = prune(second, dir.packDir, { policy: retention, nowMs: NOW, dryRun: false });
        return method.apply(this, args);
      } } }, destination('/dev/null'));
      const report = prune(first, dir.packDir, { policy: retention, nowMs: NOW, dryRun: false, log });
      assert.ok(other && other.packsCompacted >= 1, `the second prune compacted a pack the first had listed (${other?.packsCompacted})`);
      assert.ok(report.packsCompacted >= 1);
    } finally {
      first.close();
      second.close();
    }
    for (const p of points.slice(2)) await assertRestores(d, 'lambda', disk, p);
    const verify = await runJson('receiver', ['verify', '--data', d.receiver.dataDir]);
    assert.equal(verify.ok, true, JSON.stringify(verify.damaged));
  });
});

describe('prune killed with SIGKILL', () => {
  let d: Deployment;
  after(() => d?.close());

  it('never loses a kept point, whenever it dies', async () => {
    d = await Deployment.start();
    await d.enroll('lambda');
    const ages = [96, 80, 72, 60, 50, 49, 48, 0].map((h) => h * HOUR);
    const { disk, points } = await makeHistory(d, 'lambda', ages);
    const kept = [points[6]!, points[7]!]; // the newest of the 2-day-old day, and the newest
    const random = makePrng(4242);
    let kills = 0;
    for (let attempt = 0; attempt < 40; attempt++) {
      const child = spawnCli('receiver', ['prune', '--data', d.receiver.dataDir, ...policy]);
      // Early kills come early, so that on a fast machine too some land mid-way; later ones come
      // later, so that on a slow machine too some prune gets to finish.
      const delayMs = 60 + attempt * 40 + (random() % 80);
      const timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
      const result = await collect(child);
      clearTimeout(timer);
      if (result.signal === 'SIGKILL') kills++;
      if (process.env.TIDEMARK_TEST_DEBUG) console.log('prune attempt', attempt, delayMs, result.signal ?? result.code);
      // After every interruption the listing holds every kept point and each one still restores.
      const listed = (await d.points('lambda')).map((p) => p.id);
      for (const p of kept) assert.ok(listed.includes(p.id), `kept point ${p.id} still listed after a kill at ${delayMs} ms`);
      await assertRestores(d, 'lambda', disk, kept[0]!);
      if (result.code === 0) break;
    }
    assert.ok(kills >= 1, 'at least one prune was killed mid-way');
    assert.ok(kills < 40, 'a prune finished after the kills');
    const final = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, ...policy]);
    assert.equal(final.pointsDropped, 0);
    assert.deepEqual((await d.points('lambda')).map((p) => p.id), kept.map((p) => p.id));
    for (const p of kept) await assertRestores(d, 'lambda', disk, p);
    const verify = await runCli('receiver', ['verify', '--data', d.receiver.dataDir]);
    assert.ok(verify.code === 0 || /unknown command/.test(verify.stderr), `verify after the kills: ${verify.stderr}`);
  });
});

describe('a point pruned while it is being read', () => {
  let d: Deployment;
  after(() => d?.close());

  it('ends the export with a line that says the point was removed, not that a chunk is missing', async () => {
    d = await Deployment.start();
    await d.enroll('mu');
    const disk = join(d.root, 'mu.img');
    writeFileSync(disk, randomBytes(16 * MiB));
    const first = await d.syncOnce('mu', [disk]);
    writeFileSync(disk, randomBytes(16 * MiB)); // every block rewritten: the first point's chunks are its own
    await d.syncOnce('mu', [disk]);

    const child = spawnCli('restore', ['export', ...d.restoreArgs('mu'), '--point', String(first.pointId), '--to', '-'], { TIDEMARK_TOKEN: d.restoreToken });
    let stderr = '';
    child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    // The tar has started; unread, the pipe fills and holds the export mid-stream.
    await once(child.stdout!, 'readable');
    const pruned = await runJson('receiver', ['prune', '--data', d.receiver.dataDir, '--keep-within', '0s', '--keep-hourly', '0', '--keep-daily', '0']);
    assert.equal(pruned.pointsDropped, 1);
    child.stdout!.resume();
    assert.equal(await exited, 9, stderr);
    assert.match(stderr, new RegExp(`point ${first.pointId} was removed on the receiver \\(retention or forget\\) while it was being read; list the points again`));
  });
});

describe('serve\'s scheduled prune', () => {
  let d: Deployment;
  after(() => d?.close());

  // A prune waits for the catalog's write lock (an operator's prune or backup holding it,
  // or serve's own ingest) and compacts packs for as long as that takes; serve must go on
  // answering its sessions meanwhile. The lock is held here by a transaction of the test.
  it('keeps serve answering while it waits for the catalog, then finishes', async () => {
    d = await Deployment.start();
    await d.enroll('mu');
    const disk = join(d.root, 'mu.img');
    await writeMixedImage(disk, 4 * MiB, 31);
    await d.syncOnce('mu', [disk]);
    writeFileSync(join(d.receiver.dataDir, 'config.json'), JSON.stringify({ pruneInterval: '1s' }));
    await d.receiver.restart();
    const conn = await restoreSession(d, vaultKeys(d.keyFile));
    const lock = new Database(join(d.receiver.dataDir, 'catalog.db'));
    let latencyMs: number;
    let logBefore: number;
    try {
      lock.exec('BEGIN IMMEDIATE');
      await sleep(2000); // a scheduled prune has started and waits for the lock (busy timeout 5 s)
      logBefore = d.receiver.log.length;
      const asked = Date.now();
      const { points } = await conn.request('points.list', { host: 'mu', afterId: null });
      latencyMs = Date.now() - asked;
      assert.equal(points.length, 1);
      await sleep(3500 - 2000 - latencyMs); // the lock is held 3.5 s: well within the prune's 5 s
    } finally {
      lock.exec('ROLLBACK');
      lock.close();
      conn.close();
    }
    assert.ok(latencyMs < 1000, `serve answered points.list in ${latencyMs} ms while its prune waited for the catalog`);
    const finished = await waitForLog(d, logBefore, '"msg":"prune finished"', 10_000);
    assert.equal(JSON.parse(finished).pointsDropped, 0, 'the newest point is always kept');
    assert.ok(!d.receiver.log.includes('scheduled prune failed'), d.receiver.log);
  });
});

async function waitForLog(d: Deployment, from: number, text: string, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const line = d.receiver.log.slice(from).split('\n').find((l) => l.includes(text));
    if (line) return line;
    if (Date.now() > deadline) throw new Error(`no "${text}" in the receiver log within ${timeoutMs} ms:\n${d.receiver.log.slice(from)}`);
    await sleep(100);
  }
}
