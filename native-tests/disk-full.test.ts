// Disk full (issue 6, promise 5): the receiver's data directory on a small ext4
// loop-device filesystem, nearly filled by a file of ours; a continuously running
// agent ships more than the free space. Replication must pause with a clear error
// (agent status Error naming the receiver's full disk; the receiver logs it once,
// not per chunk), the receiver stays up and serves what it committed, and once the
// filler is deleted the agent resumes the open point by itself and commits a point
// that restores identical. A second case forces a refused chunk's reply and the
// failed staging behind it into one delivery: the agent must still name the full
// disk, not the missing chunk. Needs root (losetup, mount); elsewhere it skips.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { closeSync, copyFileSync, fsyncSync, mkdirSync, openSync, readdirSync, rmSync, statSync, statfsSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import { decodeReply } from '../shared/protocol.js';
import { createLogger } from '../shared/log.js';
import { AgentState } from '../agent/state.js';
import { PACK_HEADER_BYTES } from '../receiver/pack-store.js';
import { syncOnce } from '../agent/sync.js';
import { Deployment, ReceiverProcess, attachLoop, runJson, spawnCli, tempDir } from '../test/harness.js';
import { changeBlocks, sha256File, writeMixedImage } from '../test/fixtures.js';
import { vaultKeys } from '../test/point-check.js';

const MiB = 1024 * 1024;
const FS_BYTES = 64 * MiB;
const IMAGE_BYTES = 24 * MiB;
/** Free space left beside the filler: far less than the change the agent ships. */
const LEFT_FREE = 4 * MiB;

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (loop device and mount)';
  try {
    for (const [tool, arg] of [['losetup', '--version'], ['mkfs.ext4', '-V'], ['mount', '--version'], ['umount', '--version']] as const) {
      execFileSync(tool, [arg], { stdio: 'ignore' });
    }
  } catch {
    return 'needs losetup, mount and mkfs.ext4 (util-linux, e2fsprogs)';
  }
  return undefined;
}

const skip = skipReason();
if (skip) console.log(`# native-tests/disk-full: skipped: ${skip}`);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function waitFor<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined> | T | undefined): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(250);
  }
}

function writeFiller(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  try {
    const chunk = Buffer.alloc(MiB, 0x5a);
    for (let done = 0; done < bytes; done += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - done));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

describe('receiver disk full', { skip }, () => {
  const root = tempDir('tidemark-diskfull-');
  const mnt = join(root, 'mnt');
  let loop: string | undefined;
  let mounted = false;
  let d: Deployment | undefined;
  let agent: ChildProcess | undefined;

  before(async () => {
    const fsImage = join(root, 'fs.img');
    execFileSync('truncate', ['-s', String(FS_BYTES), fsImage]);
    execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', fsImage], { stdio: 'ignore' });
    loop = attachLoop(fsImage);
    mkdirSync(mnt);
    execFileSync('mount', [loop, mnt]);
    mounted = true;
    d = new Deployment();
    d.receiver = await ReceiverProcess.init(join(mnt, 'receiver'));
    d.restoreToken = await d.receiver.token(true);
  });

  after(async () => {
    if (agent && agent.exitCode === null && agent.signalCode === null) {
      const exited = new Promise((r) => agent!.once('exit', r));
      agent.kill('SIGTERM');
      await exited;
    }
    await d?.close();
    if (mounted) execFileSync('umount', [mnt]);
    if (loop) execFileSync('losetup', ['-d', loop]);
    rmSync(root, { recursive: true, force: true });
  });

  it('pauses with a clear error, keeps what was committed, and resumes by itself once space is freed', async () => {
    const dep = d!;
    const state = await dep.enroll('brimful');
    const disk = join(dep.root, 'brimful.img');
    await writeMixedImage(disk, IMAGE_BYTES, 77);
    const first = await dep.syncOnce('brimful', [disk]);
    const firstCopy = join(dep.root, 'first.img');
    copyFileSync(disk, firstCopy);
    const firstSha = await sha256File(firstCopy);

    // Fill the receiver's filesystem, then change the disk by four times what is left.
    const filler = join(mnt, 'filler');
    const stat = statfsSync(mnt);
    writeFiller(filler, stat.bavail * stat.bsize - LEFT_FREE);
    const changed = new Set(await changeBlocks(disk, 64 * 1024, 256, 78)); // 16 MiB of random data
    const imageSha = await sha256File(disk);
    const logBefore = dep.receiver.log.length;

    // A bandwidth limit keeps the agent waiting to send while the receiver already refuses chunks.
    agent = spawnCli('agent', ['run', '--interval', '1s', '--json', '--bwlimit', '8M', '--state', state, '--disk', disk]);
    const points: any[] = [];
    let stdout = '';
    agent.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      const lines = stdout.split('\n');
      stdout = lines.pop()!;
      for (const line of lines) if (line.startsWith('{') && JSON.parse(line).event === 'point') points.push(JSON.parse(line));
    });
    let agentStderr = '';
    agent.stderr!.on('data', (chunk: Buffer) => (agentStderr += chunk.toString()));

    // 1. Replication pauses with a clear error naming the receiver's full disk.
    const status = await waitFor('agent status Error', 60_000, async () => {
      assert.equal(agent!.exitCode, null, `the agent exited: ${agentStderr}`);
      const s = await runJson('agent', ['status', '--state', state]);
      return s.state === 'Error' ? s : undefined;
    });
    assert.match(status.reason, /receiver disk full/, `status reason: ${status.reason}`);
    assert.match(status.reason, /free space/, 'the reason says what to do');
    assert.match(status.reason, /retrying in/, 'the agent retries by itself');
    await sleep(4000); // a few retries (backoff 1 s, 2 s) against the full disk
    assert.equal(agent.exitCode, null, `the agent keeps running: ${agentStderr}`);
    assert.equal(points.length, 0, 'no point is committed while the disk is full');

    // 2. The receiver stays up and serves what it committed; nothing partial is listed.
    assert.doesNotThrow(() => process.kill(dep.receiver.pid, 0), 'the receiver is still running');
    assert.deepEqual((await dep.points('brimful')).map((p) => p.id), [first.pointId]);
    const during = join(dep.root, 'during.img');
    await dep.restore('brimful', disk, first.pointId, during);
    assert.equal(await sha256File(during), firstSha, 'the committed point restores identical during the outage');

    // The receiver's status shows why, whatever the agents last reported.
    const full = await runJson('receiver', ['status', '--data', dep.receiver.dataDir]);
    assert.ok(full.space.freeBytes < LEFT_FREE, `status shows the full disk: ${JSON.stringify(full.space)}`);
    assert.ok(full.space.totalBytes > FS_BYTES / 2 && full.space.totalBytes <= FS_BYTES, JSON.stringify(full.space)); // less the filesystem's own

    // 3. Logged once per failure, not once per chunk.
    const log = dep.receiver.log.slice(logBefore).split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, any>);
    const storageLines = log.filter((l) => l.code === 'E_STORAGE' || /storage/.test(String(l.msg)));
    assert.ok(storageLines.length >= 1 && storageLines.length <= 2, `storage failure logged once, not per chunk: ${storageLines.length} lines:\n${storageLines.map((l) => JSON.stringify(l)).join('\n')}`);
    assert.match(String(storageLines[0]!.reason), /receiver disk full/);

    // 4. Space freed: the agent resumes the open point by itself and commits the changed disk.
    rmSync(filler);
    const freed = await runJson('receiver', ['status', '--data', dep.receiver.dataDir]);
    assert.ok(freed.space.freeBytes > 4 * LEFT_FREE, `status shows the freed space: ${JSON.stringify(freed.space)}`);
    const resumed = await waitFor('a point after space was freed', 90_000, () => points[0]);
    assert.equal(resumed.resumed, true, 'the cycle after the outage continued the open point');
    const listed = (await dep.points('brimful')).find((p) => p.id === resumed.pointId);
    assert.equal(listed.disks[0].changedBytes, changed.size * 64 * 1024, 'the point counts the blocks staged before the outage too');
    const exited = new Promise((r) => agent!.once('exit', r));
    agent.kill('SIGTERM');
    await exited;
    const after = join(dep.root, 'after.img');
    await dep.restore('brimful', disk, resumed.pointId, after);
    assert.equal(await sha256File(after), imageSha, 'the point committed after the outage restores identical to the disk');
    const again = join(dep.root, 'again.img');
    await dep.restore('brimful', disk, first.pointId, again);
    assert.equal(await sha256File(again), firstSha, 'the point committed before the outage is undamaged');
    assert.ok(dep.receiver.log.includes('receiver storage writable again'), 'the receiver logs the recovery');
    const verify = await runJson('receiver', ['verify', '--data', dep.receiver.dataDir]);
    assert.equal(verify.ok, true, JSON.stringify(verify.damaged));

    // 5. The packs opened for the refused chunks hold nothing (a pack header only); a prune removes them.
    const emptyPacks = () => readdirSync(join(dep.receiver.dataDir, 'packs'), { recursive: true, encoding: 'utf8' })
      .filter((f) => f.endsWith('.pack') && statSync(join(dep.receiver.dataDir, 'packs', f)).size <= PACK_HEADER_BYTES);
    assert.ok(emptyPacks().length > 0, 'the outage left empty packs behind');
    await dep.receiver.restart(); // serve seals the packs of earlier runs: only sealed packs are compacted
    const pruned = await runJson('receiver', ['prune', '--data', dep.receiver.dataDir]);
    assert.equal(pruned.pointsDropped, 0);
    assert.deepEqual(emptyPacks(), [], 'prune removed the empty packs');
  });

  it('names the full disk, not a missing chunk, when the refusals and the staging reply arrive together', async () => {
    const dep = d!;
    const state = AgentState.open(await dep.enroll('crammed'), { mustBeEnrolled: true });
    const disk = join(dep.root, 'crammed.img');
    writeFileSync(disk, randomBytes(2 * LEFT_FREE)); // incompressible: twice the space left
    const filler = join(mnt, 'filler');
    const stat = statfsSync(mnt);
    writeFiller(filler, stat.bavail * stat.bsize - LEFT_FREE);
    // The agent sends a batch's blocks.put right behind its chunk.puts; a refused chunk fails both.
    // On a busy link both replies come in one read. Forced here: chunk.put replies are held until
    // the blocks.put reply arrives, then all are delivered in one go (only the timing changes).
    const proto = ReceiverConnection.prototype as any;
    const originalOnMessage = proto.onMessage;
    let deliveredTogether = 0;
    proto.onMessage = function (this: any, data: Buffer, isBinary: boolean) {
      this.held ??= [];
      const type = this.pending.get(decodeReply(data).rid)?.type;
      if (type === 'chunk.put') return void this.held.push(data);
      if (type === 'blocks.put' && this.held.length > 0) deliveredTogether++;
      for (const frame of this.held.splice(0)) originalOnMessage.call(this, frame, true);
      originalOnMessage.call(this, data, isBinary);
    };
    try {
      const failure = await syncOnce({
        state, keys: vaultKeys(dep.keyFile), diskPaths: [disk], blockBytes: 64 * 1024, bytesPerSecond: 0, json: false, log: createLogger('test', 'warn'),
      }).then(() => assert.fail('the sync succeeded on a full disk'), (err: unknown) => err);
      assert.ok(deliveredTogether > 0, 'chunk refusals and a staging reply were delivered together');
      assert.ok(failure instanceof TidemarkError, String(failure));
      assert.equal(failure.code, 'E_STORAGE', failure.message);
      assert.match(failure.message, /receiver disk full/);
    } finally {
      proto.onMessage = originalOnMessage;
      state.close();
      rmSync(filler);
    }
  });
});
