// Continuous mode on a real block device (loop device, ext4 mounted, tracefs
// write tracking): the incremental cost of a 1 % change, and replication lag
// under a sustained random-write load, ramped to find the highest rate the
// agent keeps up with (p99 < 5 s).
//
// Lag of one write: from the moment the write was durable (its fdatasync
// returned) to the moment the agent reported, as a `{"event":"point"}` line,
// the first committed point whose cut time is at or after that moment.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, fdatasyncSync, openSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { collect, REPO_ROOT } from '../test/harness.js';
import { tracefsUnavailableReason } from '../agent/tracefs.js';
import type { BenchCluster } from './cluster.js';
import { MountedLoop } from './loop-device.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const FIRST_STEP = { mbps: 20, seconds: 20 };
const RAMP_MBPS = [40, 80, 160];
const RAMP_SECONDS = 10;
const SUSTAINED_P99_SECONDS = 5;
/** After the load stops, how long to wait for a point covering its last write. */
const CATCH_UP_MS = 30_000;

export interface LagStep { targetMBps: number; achievedMBps: number; writes: number; p50Seconds: number; p99Seconds: number; unreplicated: number }

export interface ContinuousResults {
  device: string;
  initialSeconds: number;
  incremental: { changedBytes: number; seconds: number; bytesRead: number; readVsChange: number; lagSeconds: number };
  lag: LagStep[];
  sustainedMBps: number | null;
  sustainedNote: string;
  /** Peak RSS of the continuous agent (initial sync of the device, the 1 % change, the lag ramp). */
  agentPeakRssBytes: number;
}

interface PointSeen { arrivalMs: number; cutMs: number; bytesRead: number; durationMs: number; mode: string }

/** The agent's point events as they arrive, with their arrival time. */
class PointLog {
  readonly points: PointSeen[] = [];
  private waiters: Array<() => void> = [];
  private exited: string | null = null;

  constructor(child: ChildProcess) {
    let buffered = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => {
      buffered += d.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) {
        if (!line.startsWith('{"event":"point"')) continue;
        const e = JSON.parse(line) as { time: string; bytesRead?: number; durationMs?: number; mode?: string };
        this.points.push({ arrivalMs: Date.now(), cutMs: Date.parse(e.time), bytesRead: e.bytesRead ?? 0, durationMs: e.durationMs ?? 0, mode: e.mode ?? '' });
      }
      this.wake();
    });
    child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
    child.once('exit', (code, signal) => {
      this.exited = `agent exited (${code ?? signal}): ${stderr.trim()}`;
      this.wake();
    });
  }

  /** The first point (in arrival order) that satisfies `test`; rejects after `timeoutMs` or if the agent dies. */
  async waitFor(test: (p: PointSeen) => boolean, timeoutMs: number): Promise<PointSeen> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.points.find(test);
      if (found) return found;
      if (this.exited) throw new Error(this.exited);
      if (Date.now() > deadline) throw new Error(`no matching point within ${timeoutMs / 1000} s`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 500);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
}

export function continuousUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (loop devices, mount, tracefs)';
  for (const tool of ['losetup', 'mount', 'umount']) {
    if (spawnSync(tool, ['--version'], { stdio: 'ignore' }).status !== 0) return `needs ${tool} (util-linux / mount)`;
  }
  return tracefsUnavailableReason();
}

/** A file of random content, durable: blocks that exist before the agent starts, so later writes allocate nothing. */
function writeRandomFile(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  try {
    for (let done = 0; done < bytes; done += MiB) writeSync(fd, randomBytes(Math.min(MiB, bytes - done)));
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Overwrites a file in place with new random content; durable when it returns. */
function overwrite(path: string, bytes: number): void {
  const fd = openSync(path, 'r+');
  try {
    for (let done = 0; done < bytes; done += MiB) writeSync(fd, randomBytes(Math.min(MiB, bytes - done)), 0, Math.min(MiB, bytes - done), done);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

async function lagStep(points: PointLog, loadFile: string, mbps: number, seconds: number): Promise<LagStep> {
  const child = spawn(process.execPath, [join(REPO_ROOT, 'dist', 'bench', 'write-load.js'), loadFile, String(mbps * 1e6), String(seconds)], { stdio: ['ignore', 'pipe', 'pipe'] });
  const result = await collect(child);
  if (result.code !== 0) throw new Error(`write-load failed (${result.code}): ${result.stderr.trim()}`);
  const { doneMs, bytes } = JSON.parse(result.stdout) as { doneMs: number[]; bytes: number };
  const last = Math.max(...doneMs);
  await points.waitFor((p) => p.cutMs >= last, CATCH_UP_MS).catch(() => null);
  const now = Date.now();
  let unreplicated = 0;
  const lags = doneMs.map((t) => {
    const point = points.points.find((p) => p.cutMs >= t);
    if (point) return (point.arrivalMs - t) / 1000;
    unreplicated++;
    return (now - t) / 1000; // a lower bound: not replicated when we stopped waiting
  }).sort((a, b) => a - b);
  return { targetMBps: mbps, achievedMBps: bytes / 1e6 / seconds, writes: doneMs.length, p50Seconds: percentile(lags, 50), p99Seconds: percentile(lags, 99), unreplicated };
}

export async function continuousBench(cluster: BenchCluster, image: string, work: string, opts: { dataBytes: number; say: (line: string) => void }): Promise<ContinuousResults> {
  const copy = join(work, 'continuous.img');
  const cp = spawnSync('cp', ['--sparse=always', image, copy]);
  if (cp.status !== 0) throw new Error(`cp failed: ${cp.stderr}`);
  const loop = MountedLoop.attach(copy, join(work, 'mnt'));
  let agent: ReturnType<BenchCluster['spawnAgent']> | null = null;
  try {
    const changeFile = join(loop.mountPoint, 'bench-change.dat');
    const loadFile = join(loop.mountPoint, 'bench-load.dat');
    const changeBytes = Math.max(BLOCK, Math.round((opts.dataBytes * 0.01) / BLOCK) * BLOCK);
    writeRandomFile(changeFile, changeBytes);
    writeRandomFile(loadFile, 128 * MiB);

    await cluster.enroll('continuous');
    agent = cluster.spawnAgent('continuous', ['--disk', loop.device, '--interval', '1s', '--tracker', 'tracefs']);
    const points = new PointLog(agent.child);
    const initial = await points.waitFor((p) => p.mode === 'initial', 30 * 60_000);
    opts.say(`  initial sync of ${loop.device} took ${(initial.durationMs / 1000).toFixed(1)} s`);
    // One quiet point after the initial one: the incremental starts from a settled agent.
    await points.waitFor((p) => p.arrivalMs > initial.arrivalMs && p.mode === 'incremental', 60_000);

    const startMs = Date.now();
    overwrite(changeFile, changeBytes);
    const doneMs = Date.now();
    const covering = await points.waitFor((p) => p.cutMs >= doneMs, 60_000);
    const involved = points.points.filter((p) => p.arrivalMs > startMs && p.arrivalMs <= covering.arrivalMs && p.bytesRead > 0);
    const bytesRead = involved.reduce((sum, p) => sum + p.bytesRead, 0);
    const incremental = {
      changedBytes: changeBytes,
      seconds: involved.reduce((sum, p) => sum + p.durationMs, 0) / 1000,
      bytesRead,
      readVsChange: bytesRead / changeBytes,
      lagSeconds: (covering.arrivalMs - doneMs) / 1000,
    };

    const lag: LagStep[] = [];
    let sustainedMBps: number | null = null;
    let sustainedNote = `ramp ${[FIRST_STEP.mbps, ...RAMP_MBPS].join(', ')} MB/s of 64 KiB random writes`;
    for (const [mbps, seconds] of [[FIRST_STEP.mbps, FIRST_STEP.seconds], ...RAMP_MBPS.map((r) => [r, RAMP_SECONDS])] as Array<[number, number]>) {
      opts.say(`  random writes at ${mbps} MB/s for ${seconds} s...`);
      const step = await lagStep(points, loadFile, mbps, seconds);
      lag.push(step);
      if (step.p99Seconds >= SUSTAINED_P99_SECONDS || step.unreplicated > 0) {
        sustainedNote += `; p99 reached ${step.p99Seconds.toFixed(1)} s at ${mbps} MB/s`;
        break;
      }
      sustainedMBps = step.achievedMBps;
      if (step.achievedMBps < 0.8 * mbps) {
        sustainedNote += `; the writer itself managed only ${step.achievedMBps.toFixed(1)} MB/s (fdatasync-bound), so this is a lower bound`;
        break;
      }
    }
    agent.watch.sample();
    return { device: loop.device, initialSeconds: initial.durationMs / 1000, incremental, lag, sustainedMBps, sustainedNote, agentPeakRssBytes: agent.watch.peakRssBytes };
  } finally {
    if (agent) {
      const exited = new Promise((r) => agent!.child.once('exit', r));
      if (agent.child.exitCode === null && agent.child.signalCode === null) {
        agent.child.kill('SIGTERM');
        const timer = setTimeout(() => agent!.child.kill('SIGKILL'), 20_000);
        await exited;
        clearTimeout(timer);
      }
    }
    for (const problem of loop.close()) opts.say(`  cleanup: ${problem}`);
  }
}
