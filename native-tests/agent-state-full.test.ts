// The agent's state directory on a full filesystem (a small tmpfs, nearly filled
// by a file of ours): the hash file of a first sync does not fit. `run --once`
// exits 11 with one line naming the state directory and what to do (not the
// receiver); continuous `run` (hash scan, and kernel tracking of a loop device)
// keeps retrying, says why in its log, and commits a point by itself once space is
// freed; a hash file write that does not fit fails whole. Needs root (mount; the
// tracking case also tracefs and losetup); elsewhere it skips.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, ftruncateSync, mkdirSync, openSync, rmSync, statfsSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { HashFile } from '../agent/state.js';
import { join } from 'node:path';
import { Deployment, attachLoop, runCli, spawnCli, tempDir } from '../test/harness.js';
import { sha256File, writeMixedImage } from '../test/fixtures.js';

const MiB = 1024 * 1024;
/** 4 KiB blocks: the image's hash file is 1 MiB, four times what is left free. */
const IMAGE_BYTES = 512 * MiB;
const LEFT_FREE = 256 * 1024;

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (mount)';
  try {
    execFileSync('mount', ['--version'], { stdio: 'ignore' });
  } catch {
    return 'needs mount (util-linux)';
  }
  return undefined;
}

const skip = skipReason();
if (skip) console.log(`# native-tests/agent-state-full: skipped: ${skip}`);

/** Kernel tracking of a loop device: tracefs with block tracepoints (the agent mounts tracefs itself), losetup. */
function trackingSkipReason(): string | undefined {
  if (skip) return skip;
  if (!existsSync('/sys/kernel/tracing/events/block/block_bio_queue')) return 'needs tracefs with block tracepoints at /sys/kernel/tracing';
  try {
    execFileSync('losetup', ['--version'], { stdio: 'ignore' });
  } catch {
    return 'needs losetup (util-linux)';
  }
  return undefined;
}

const oneLine = (s: string) => {
  const lines = s.trim().split('\n');
  assert.equal(lines.length, 1, `expected a one-line error, got:\n${s}`);
  return lines[0]!;
};

async function waitFor<T>(what: string, timeoutMs: number, probe: () => T | undefined): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Creates `path`, filling its filesystem up to `leftFree` bytes. */
function fill(path: string, leftFree: number): void {
  rmSync(path, { force: true });
  const st = statfsSync(join(path, '..'));
  const bytes = st.bavail * st.bsize - leftFree;
  const fd = openSync(path, 'w');
  try {
    const chunk = Buffer.alloc(64 * 1024, 0x5a);
    for (let done = 0; done < bytes; done += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - done));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

const jsonLines = (text: string) => text.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, any>);

/** An agent `run` process, its stdout and stderr as they come. */
function startAgent(args: string[]): { child: ChildProcess; out: { stdout: string; stderr: string } } {
  const child = spawnCli('agent', ['run', '--interval', '1s', '--json', ...args]);
  const out = { stdout: '', stderr: '' };
  child.stdout!.on('data', (b: Buffer) => (out.stdout += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out.stderr += b.toString()));
  return { child, out };
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

/**
 * With the state directory's filesystem full: the agent keeps running and logs a retry that names the
 * directory; once `filler` is removed it commits a point by itself. Returns the first point after that.
 */
async function retriesUntilFreed(agent: { child: ChildProcess; out: { stdout: string; stderr: string } }, stateDir: string, filler: string): Promise<Record<string, any>> {
  const running = () => assert.equal(agent.child.exitCode, null, `the agent exited: ${agent.out.stderr}`);
  const warning = await waitFor('a retry warning', 30_000, () => {
    running();
    return jsonLines(agent.out.stderr).find((l) => l.msg === 'cycle failed; will retry');
  });
  assert.equal(warning.code, 'E_STORAGE');
  assert.ok(String(warning.reason).includes(`agent state directory ${stateDir}`), warning.reason);
  const pointsBefore = jsonLines(agent.out.stdout).filter((e) => e.event === 'point').length;
  rmSync(filler);
  return waitFor('a point after space was freed', 90_000, () => {
    running();
    return jsonLines(agent.out.stdout).filter((e) => e.event === 'point')[pointsBefore];
  });
}

describe('agent state directory on a full filesystem', { skip }, () => {
  const root = tempDir('tidemark-statefull-');
  const mnt = join(root, 'mnt');
  const stateDir = join(mnt, 'state');
  const filler = join(mnt, 'filler');
  let mounted = false;
  let d: Deployment | undefined;
  let disk: string;
  let agent: { child: ChildProcess; out: { stdout: string; stderr: string } } | undefined;
  let loop: string | undefined;

  before(async () => {
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m,mode=0700', 'tmpfs', mnt]);
    mounted = true;
    d = await Deployment.start();
    const enrolled = await runCli('agent', d.enrollArgs(stateDir, 'cramped'), { TIDEMARK_TOKEN: await d.receiver.token() });
    assert.equal(enrolled.code, 0, enrolled.stderr);
    disk = join(d.root, 'cramped.img');
    await writeMixedImage(disk, 8 * MiB, 31);
    truncateSync(disk, IMAGE_BYTES); // the rest a hole: a quick sync, but as many blocks to hash
    fill(filler, LEFT_FREE);
  });

  after(async () => {
    if (agent) await stop(agent.child);
    await d?.close();
    if (loop) execFileSync('losetup', ['-d', loop]);
    if (mounted) execFileSync('umount', [mnt]);
    rmSync(root, { recursive: true, force: true });
  });

  it('run --once: exit 11, one line naming the state directory and what to do', async () => {
    const r = await runCli('agent', ['run', '--once', '--block-size', '4K', '--state', stateDir, '--disk', disk]);
    assert.equal(r.code, 11, r.stderr);
    const line = oneLine(r.stderr);
    assert.ok(line.includes(`agent state directory ${stateDir}`), line);
    assert.match(line, /this host's disk is full: .*free space on that filesystem and retry/);
    assert.doesNotMatch(line, /receiver/, 'the receiver is not the one out of space');
  });

  it('a hash file write that does not fit fails, rather than writing part of it (the rest would keep older hashes)', () => {
    const path = join(mnt, 'sparse.xxh64');
    const fd = openSync(path, 'w');
    ftruncateSync(fd, MiB); // a hole, as a new hash file is: its pages are allocated as written
    closeSync(fd);
    const file = HashFile.open(path);
    try {
      // tmpfs (as ext4) writes what fits and returns a short count, without an error.
      assert.throws(() => file.write(0, new BigUint64Array(MiB / 8).fill(7n)), { code: 'ENOSPC' });
    } finally {
      file.close();
      rmSync(path);
    }
  });

  it('continuous run: retries, logging why, and commits a point by itself once space is freed', { timeout: 120_000 }, async () => {
    agent = startAgent(['--block-size', '4K', '--state', stateDir, '--disk', disk]);
    const point = await retriesUntilFreed(agent, stateDir, filler);
    await stop(agent.child);
    const restored = join(d!.root, 'restored.img');
    await d!.restore('cramped', disk, point.pointId, restored);
    assert.equal(await sha256File(restored), await sha256File(disk));
  });

  it('continuous run with kernel tracking (a loop device): the same, and its last point equals the device', { timeout: 120_000, skip: trackingSkipReason() }, async () => {
    const image = join(d!.root, 'tracked.img');
    writeFileSync(image, randomBytes(32 * MiB));
    loop = attachLoop(image);
    const tracked = join(mnt, 'tracked');
    const enrolled = await runCli('agent', d!.enrollArgs(tracked, 'tracked'), { TIDEMARK_TOKEN: await d!.receiver.token() });
    assert.equal(enrolled.code, 0, enrolled.stderr);
    agent = startAgent(['--tracker', 'tracefs', '--state', tracked, '--disk', loop]);
    await waitFor('the initial point', 60_000, () => jsonLines(agent!.out.stdout).find((e) => e.event === 'point'));
    fill(filler, 0);
    const fd = openSync(loop, 'r+');
    try {
      writeSync(fd, randomBytes(MiB), 0, MiB, 10 * 64 * 1024);
      fsyncSync(fd); // to the device: the kernel's block layer, and so tracefs, sees the writes
    } finally {
      closeSync(fd);
    }
    await retriesUntilFreed(agent, tracked, filler);
    await stop(agent.child);
    const points = await d!.points('tracked');
    const restored = join(d!.root, 'tracked-restored.img');
    await d!.restore('tracked', loop, points.at(-1).id, restored);
    assert.equal(await sha256File(restored), await sha256File(loop));
  });
});
