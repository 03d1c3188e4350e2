// End to end through real processes: receiver, agent and restore CLIs on loopback.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { xxh3, xxh64 } from '@node-rs/xxhash';
import { join } from 'node:path';
import { ReceiverConnection } from '../shared/connection.js';
import { createLogger } from '../shared/log.js';
import { AgentState } from '../agent/state.js';
import { syncOnce } from '../agent/sync.js';
import { Deployment, collect, lastEvent, runJson, spawnCli } from './harness.js';
import { changeBlocks, sha256File, writeMixedImage } from './fixtures.js';
import { vaultKeys } from './point-check.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;

describe('replication end to end', () => {
  let d: Deployment;
  let disk: string;

  before(async () => {
    d = await Deployment.start();
    await d.enroll('alpha');
    disk = join(d.root, 'alpha-disk.img');
    await writeMixedImage(disk, 48 * MiB, 1);
  });
  after(() => d?.close());

  it('round trip: an initial sync restores byte-identical', async () => {
    const result = await d.syncOnce('alpha', [disk]);
    assert.equal(result.initial, true);
    assert.equal(result.crashConsistent, true);
    assert.ok(result.chunksUploaded > 0);
    const [point] = await d.points('alpha');
    assert.equal(point.id, result.pointId);
    assert.equal(point.disks[0].name, disk);
    assert.equal(point.disks[0].sizeBytes, 48 * MiB);
    const out = join(d.root, 'round-trip.img');
    const restored = await d.restore('alpha', disk, point.id, out);
    assert.equal(await sha256File(out), await sha256File(disk));
    // Sparse: zero regions of the source stay holes in the restored image.
    assert.ok(statSync(out).blocks * 512 < 48 * MiB, 'restored image is sparse');
    assert.ok(restored.bytesWritten < 48 * MiB);
  });

  it('dedup: a second disk with the same content adds no chunk data', async () => {
    const twin = join(d.root, 'alpha-twin.img');
    copyFileSync(disk, twin);
    const before = await d.receiver.status();
    const result = await d.syncOnce('alpha', [disk, twin]);
    const afterStatus = await d.receiver.status();
    assert.equal(result.chunksUploaded, 0);
    assert.ok(result.chunksDeduplicated > 0);
    assert.equal(afterStatus.storedChunkBytes, before.storedChunkBytes);
    assert.equal(afterStatus.storedChunks, before.storedChunks);
    assert.ok(result.blocksChanged > 0);
    assert.equal(afterStatus.blockVersions - before.blockVersions, result.blocksChanged, 'the twin\'s blocks are recorded, each referring to a chunk already stored');
    const points = await d.points('alpha');
    const out = join(d.root, 'twin.img');
    await d.restore('alpha', twin, points.at(-1).id, out);
    assert.equal(await sha256File(out), await sha256File(twin));
  });

  it('incremental: N changed blocks ship exactly N chunks, and each point restores its own version', async () => {
    const beforeChange = join(d.root, 'before-change.img');
    copyFileSync(disk, beforeChange);
    const pointBefore = (await d.points('alpha')).at(-1).id;
    const changed = await changeBlocks(disk, 64 * 1024, 9, 42);
    const statusBefore = await d.receiver.status();
    const result = await d.syncOnce('alpha', [disk]);
    const statusAfter = await d.receiver.status();
    assert.equal(result.initial, false);
    assert.equal(result.blocksChanged, changed.length);
    assert.equal(result.chunksUploaded, changed.length);
    assert.equal(statusAfter.storedChunks - statusBefore.storedChunks, changed.length, 'receiver stored exactly the changed blocks');
    assert.equal(statusAfter.blockVersions - statusBefore.blockVersions, changed.length, 'the catalog gained a block version per changed block');
    // Every block version holds a 32-byte chunk id, so the catalog is at least that big, and no bigger than its files.
    assert.ok(statusAfter.catalogBytes >= statusAfter.blockVersions * 32, `catalog of ${statusAfter.catalogBytes} bytes holds ${statusAfter.blockVersions} block versions`);
    const catalogFiles = ['catalog.db', 'catalog.db-wal'].map((f) => join(d.receiver.dataDir, f)).filter(existsSync);
    assert.ok(statusAfter.catalogBytes <= catalogFiles.reduce((sum, f) => sum + statSync(f).size, 0), 'catalogBytes is no more than the catalog files hold');
    const points = await d.points('alpha');
    const newest = points.at(-1);
    assert.equal(newest.id, result.pointId);
    assert.equal(newest.disks.find((x: any) => x.name === disk).changedBytes, changed.length * 64 * 1024);
    const outOld = join(d.root, 'old.img');
    const outNew = join(d.root, 'new.img');
    await d.restore('alpha', disk, pointBefore, outOld);
    await d.restore('alpha', disk, newest.id, outNew);
    assert.equal(await sha256File(outOld), await sha256File(beforeChange));
    assert.equal(await sha256File(outNew), await sha256File(disk));
  });

  it('a rewrite with identical content ships nothing', async () => {
    const blockAt = 5 * 64 * 1024;
    const fd = readFileSync(disk).subarray(blockAt, blockAt + 64 * 1024);
    const image = readFileSync(disk);
    fd.copy(image, blockAt);
    writeFileSync(disk, image);
    const result = await d.syncOnce('alpha', [disk]);
    assert.equal(result.blocksChanged, 0);
    assert.equal(result.chunksUploaded, 0);
  });

  it('restore --at picks the newest point at or before the time', async () => {
    const points = await d.points('alpha');
    const target = points[1];
    const out = join(d.root, 'at.img');
    const result = await runJson('restore', ['disk', ...d.restoreArgs('alpha'), '--disk', disk, '--at', target.time, '--to', out], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(result.point, target.id);
  });
});

describe('interrupted initial sync', () => {
  let d: Deployment;
  after(() => d?.close());

  it('resumes after SIGKILL without re-sending committed chunks, and restores identical', async () => {
    d = await Deployment.start();
    const state = await d.enroll('beta');
    const disk = join(d.root, 'beta-disk.img');
    await writeMixedImage(disk, 64 * MiB, 7);
    // --bwlimit slows the sync (each 16 MiB read batch holds megabytes of random data, so it takes
    // over a second) so that it can be killed in the middle: at the first progress report short of
    // 100 %, which the agent prints before it commits anything.
    const child = spawnCli('agent', ['run', '--once', '--json', '--state', state, '--disk', disk, '--bwlimit', '4M']);
    let killedAt = 0;
    child.stdout!.on('data', (chunk: Buffer) => {
      for (const line of chunk.toString().split('\n').filter((l) => l.startsWith('{'))) {
        const event = JSON.parse(line);
        if (event.event === 'progress' && event.percent > 0 && event.percent < 100 && !killedAt) {
          killedAt = event.percent;
          child.kill('SIGKILL');
        }
      }
    });
    const first = await collect(child);
    assert.equal(first.signal, 'SIGKILL', `agent was killed mid-sync (exit ${first.code}: ${first.stderr})`);
    assert.deepEqual(await d.points('beta'), [], 'no point is visible after an interrupted sync');
    const storedAtKill = (await d.receiver.status()).storedChunks;
    assert.ok(storedAtKill > 0, 'some chunks were stored before the kill');

    const result = await d.syncOnce('beta', [disk]);
    const storedAfter = (await d.receiver.status()).storedChunks;
    assert.equal(result.resumed, true, 'the open point of the killed run was continued');
    assert.equal(storedAtKill + result.chunksUploaded, storedAfter, 'no chunk was uploaded twice');
    assert.ok(result.chunksUploaded < storedAfter, 'the resumed sync did not start over');
    assert.equal(result.crashConsistent, true);
    // The point's changed bytes count the blocks staged before the kill too: every non-zero block.
    const image = readFileSync(disk);
    let dataBlocks = 0;
    for (let at = 0; at < image.length; at += 64 * 1024) if (image.subarray(at, at + 64 * 1024).some((b) => b !== 0)) dataBlocks++;
    const [listed] = (await d.points('beta')).map((p) => p.disks[0]);
    assert.equal(listed.changedBytes, dataBlocks * 64 * 1024);
    const out = join(d.root, 'beta-restored.img');
    await d.restore('beta', disk, result.pointId, out);
    assert.equal(await sha256File(out), await sha256File(disk));
  });
});

describe('zero knowledge at rest', () => {
  let d: Deployment;
  after(() => d?.close());

  it('a marker written to the disk appears nowhere in the receiver data directory', async () => {
    d = await Deployment.start();
    await d.enroll('gamma');
    const disk = join(d.root, 'gamma-disk.img');
    await writeMixedImage(disk, 8 * MiB, 3);
    const marker = 'TIDEMARK-SECRET-MARKER-7f3a9c';
    const image = readFileSync(disk);
    for (let offset = 0; offset < image.length; offset += 256 * 1024) image.write(marker.repeat(100), offset);
    writeFileSync(disk, image);
    const result = await d.syncOnce('gamma', [disk]);
    assert.ok(result.chunksUploaded > 0);
    await d.receiver.stop(); // flush the WAL into the files we search
    const needles = [Buffer.from(marker), Buffer.from(marker, 'utf16le'), Buffer.from(marker).toString('base64').slice(0, 24)].map((n) => Buffer.from(n));
    let filesSearched = 0;
    const walk = (dir: string) => {
      for (const entry of readdirSync(dir, { withFileTypes: true })) {
        const path = join(dir, entry.name);
        if (entry.isDirectory()) walk(path);
        else {
          filesSearched++;
          const content = readFileSync(path);
          for (const needle of needles) assert.equal(content.indexOf(needle), -1, `marker found in ${path}`);
        }
      }
    };
    walk(d.receiver.dataDir);
    assert.ok(filesSearched >= 4, 'searched the catalog, packs and TLS files');
    // The search can find it: the plaintext disk does contain it.
    assert.ok(readFileSync(disk).indexOf(needles[0]!) >= 0);
  });
});


describe('agent stopped between the commit reply and recording it', () => {
  let d: Deployment;
  after(() => d?.close());

  // Reproduces the crash window by editing the agent's state files (SPEC §7) into what a
  // SIGKILL at that instant leaves: the open point id still set, its hashes still pending.
  it('learns from the receiver that the point was committed, and misses no later change', async () => {
    d = await Deployment.start();
    const state = await d.enroll('theta');
    const disk = join(d.root, 'theta.img');
    await writeMixedImage(disk, 4 * MiB, 5);
    const original = readFileSync(disk);
    await d.syncOnce('theta', [disk]);
    const { default: Database } = await import('better-sqlite3');
    const diskId = (new Database(join(state, 'state.db')).prepare('SELECT disk_id FROM disk').get() as { disk_id: number }).disk_id;
    const shipped = join(state, 'hashes', `${diskId}.shipped.xxh64`);
    const hashesOfPoint1 = readFileSync(shipped);

    await changeBlocks(disk, 64 * 1024, 3, 9);
    const second = await d.syncOnce('theta', [disk]);
    // The crash: point 2 committed on the receiver, but the agent still believes it open.
    copyFileSync(shipped, join(state, 'hashes', `${diskId}.pending.xxh64`));
    writeFileSync(shipped, hashesOfPoint1);
    const db = new Database(join(state, 'state.db'));
    db.prepare(`INSERT OR REPLACE INTO config (key, value) VALUES ('openPointId', ?)`).run(String(second.pointId));
    db.close();

    writeFileSync(disk, original); // the changed blocks return to their point-1 content
    const third = await d.syncOnce('theta', [disk]);
    assert.equal(third.resumed, false);
    assert.equal(third.blocksChanged, 3, 'the reverted blocks are shipped again');
    const out = join(d.root, 'theta-restored.img');
    await d.restore('theta', disk, third.pointId, out);
    assert.equal(await sha256File(out), await sha256File(disk));
  });
});

describe('agent restarted with fewer disks while a point is open', () => {
  let d: Deployment;
  after(() => d?.close());

  // The agent dies after staging both disks' blocks, before the commit; it comes back with
  // disk A only, resumes the open point and commits it. B's versions staged there must not
  // become part of B's history: the next point of B would read them where B is unchanged.
  it('the point drops the unlisted disk\'s staged blocks, and a later point of that disk restores identical', async () => {
    d = await Deployment.start();
    const stateDir = await d.enroll('delta');
    const diskA = join(d.root, 'delta-a.img');
    const diskB = join(d.root, 'delta-b.img');
    await writeMixedImage(diskA, 4 * MiB, 11);
    await writeMixedImage(diskB, 4 * MiB, 12);
    await d.syncOnce('delta', [diskA, diskB]);
    const originalB = readFileSync(diskB);

    await changeBlocks(diskB, BLOCK, 8, 13);
    const state = AgentState.open(stateDir, { mustBeEnrolled: true });
    const originalSend = ReceiverConnection.prototype.send;
    // The one thing changed: the agent stops right before sending the commit, as a SIGKILL there would.
    ReceiverConnection.prototype.send = async function (this: ReceiverConnection, type: any, body: any) {
      if (type === 'point.commit') throw new Error('killed before the commit');
      return originalSend.call(this, type, body);
    } as typeof originalSend;
    try {
      const interrupted = syncOnce({
        state, keys: vaultKeys(d.keyFile), diskPaths: [diskA, diskB], blockBytes: BLOCK, bytesPerSecond: 0, json: false, log: createLogger('test', 'warn'),
      });
      await assert.rejects(interrupted, /killed before the commit/);
    } finally {
      ReceiverConnection.prototype.send = originalSend;
      state.close();
    }

    writeFileSync(diskB, originalB); // B's blocks return to the content of its last point
    const resumed = await d.syncOnce('delta', [diskA]);
    assert.equal(resumed.resumed, true, 'the restarted agent resumed the open point');
    assert.deepEqual((await d.points('delta')).at(-1).disks.map((x: any) => x.name), [diskA]);
    assert.match(d.receiver.log, /"unlistedVersionsDiscarded":8/, 'the receiver logs the discarded versions');

    const later = await d.syncOnce('delta', [diskA, diskB]);
    const out = join(d.root, 'delta-b-restored.img');
    await d.restore('delta', diskB, later.pointId, out);
    assert.equal(await sha256File(out), await sha256File(diskB), 'the later point of B restores B as it is');
  });
});

describe('the agent\'s state, seen from the receiver', () => {
  let d: Deployment;
  after(() => d?.close());

  it('tidemark-receiver status shows the initial sync under way with its backlog, then Replicating', async () => {
    d = await Deployment.start();
    const state = await d.enroll('iota');
    const hostStatus = async () => (await d.receiver.status()).hosts.find((h: any) => h.name === 'iota');
    const enrolled = await hostStatus();
    assert.equal(enrolled.state, 'Initialized');
    assert.equal(enrolled.reportedAt, null, 'no report before the agent ran');

    const disk = join(d.root, 'iota.img');
    await writeMixedImage(disk, 64 * MiB, 11);
    // Slowed down so that the sync can be watched from the receiver while it runs.
    const child = spawnCli('agent', ['run', '--once', '--json', '--state', state, '--disk', disk, '--bwlimit', '4M']);
    const run = collect(child);
    let during: any;
    while (child.exitCode === null && child.signalCode === null) {
      const h = await hostStatus();
      if (h.state === 'InitialSync' && h.backlogBytes > 0 && h.bytesPerSecond > 0) {
        during = h;
        break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    const result = await run;
    assert.equal(result.code, 0, result.stderr);
    assert.ok(during, 'the receiver saw the initial sync with a backlog and a rate while it ran');
    assert.equal(during.tracker, 'scan');
    assert.equal(during.syncing, true, 'a point was open');
    assert.ok(during.backlogBytes < 64 * MiB);

    const synced = await hostStatus();
    assert.equal(synced.state, 'Replicating');
    assert.equal(synced.backlogBytes, 0);
    assert.ok(synced.bytesPerSecond > 0, 'the rate of the cycle just finished');
    assert.equal(synced.syncing, false);
    assert.equal(synced.lastPoint.id, lastEvent(result.stdout, 'point').pointId);
    assert.ok(Date.parse(synced.reportedAt) >= Date.parse(during.reportedAt));
  });
});

describe('hash files written before the XXH64 upgrade', () => {
  let d: Deployment;
  after(() => d?.close());

  // The legacy file is what agents before the upgrade wrote (SPEC §7): XXH3-64 per block, same layout.
  it('are compared once by their own hash, replaced by XXH64 files, and nothing unchanged is shipped', async () => {
    d = await Deployment.start();
    const state = await d.enroll('iota');
    const disk = join(d.root, 'iota.img');
    await writeMixedImage(disk, 4 * MiB, 11);
    await d.syncOnce('iota', [disk]);
    const { default: Database } = await import('better-sqlite3');
    const db = new Database(join(state, 'state.db'), { readonly: true });
    const diskId = (db.prepare('SELECT disk_id FROM disk').get() as { disk_id: number }).disk_id;
    db.close();
    const hashFile = (name: string) => join(state, 'hashes', name);
    const hashesOf = (image: Buffer, hash: (block: Buffer) => bigint) =>
      BigUint64Array.from({ length: image.length / BLOCK }, (_, i) => hash(image.subarray(i * BLOCK, (i + 1) * BLOCK)));
    writeFileSync(hashFile(`${diskId}.shipped`), hashesOf(readFileSync(disk), (b) => xxh3.xxh64(b)));
    rmSync(hashFile(`${diskId}.shipped.xxh64`));

    const changed = await changeBlocks(disk, BLOCK, 2, 12);
    const upgrade = await d.syncOnce('iota', [disk]);
    assert.equal(upgrade.blocksChanged, changed.length, 'only the blocks written since the last point are shipped');
    assert.ok(!existsSync(hashFile(`${diskId}.shipped`)), 'the legacy hash file is gone after the commit');
    assert.deepEqual(new BigUint64Array(new Uint8Array(readFileSync(hashFile(`${diskId}.shipped.xxh64`))).buffer), hashesOf(readFileSync(disk), (b) => xxh64(b)));

    assert.equal((await d.syncOnce('iota', [disk])).blocksChanged, 0, 'the next sync compares with the new file');
    const out = join(d.root, 'iota-restored.img');
    await d.restore('iota', disk, upgrade.pointId, out);
    assert.equal(await sha256File(out), await sha256File(disk));
  });
});
