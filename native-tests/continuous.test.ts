// Continuous replication with kernel write tracking (tracefs), under a real fsync load:
// ext4 mounted on a loop device (and on a partition of a partitioned loop device), a
// writer appending numbered records with fsync plus a SQLite database taking transactions
// (native-tests/workload.ts), the agent running `run --interval 1s --tracker tracefs`.
// In the two ext4 cases every crash-consistent point cut under the load is restored,
// attached, mounted (the journal replays) and checked (the later cases check points spread
// over their runs): every record fsynced before the cut is present, the records form a gap-free
// prefix, nothing written after the cut is in, SQLite's integrity_check is ok, e2fsck -fn
// is clean. A chain of ordered writes straight to a raw device checks every crash-consistent
// point too. Then: SIGKILL + restart of the agent, a forced trace-buffer overrun,
// receiver kills and a 30 s receiver outage, a backlog larger than a round may hold. After
// the load stops (and the source is unmounted), the newest point equals the device byte
// for byte.
//
// Needs root, tracefs with block tracepoints, losetup/mount/blockdev (util-linux, mount),
// mkfs.ext4/e2fsck (e2fsprogs), partx (util-linux) or sfdisk (fdisk) for the partition
// case, and a loadable better-sqlite3; elsewhere it skips with the reason.
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  closeSync, copyFileSync, cpSync, existsSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync,
  fsyncSync, realpathSync, rmSync, rmdirSync, statSync, truncateSync, writeFileSync, writeSync,
} from 'node:fs';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { xxh3 } from '@node-rs/xxhash';
import { readPeakRssBytes } from '../bench/proc-watch.js';
import { Deployment, attachLoop, runJson, spawnCli, tempDir } from '../test/harness.js';
import { makePrng, sha256File } from '../test/fixtures.js';
import { RECORD_BYTES, chainGap, chainSlots, newestChainWrite, parseLog, parseRecord } from './workload.js';

const MiB = 1024 * 1024;
const TRACING = '/sys/kernel/tracing';
const WORKLOAD = fileURLToPath(new URL('./workload.js', import.meta.url));
const INTERVAL = '1s';
const MODES = ['initial', 'incremental', 'resync'];
/** The ordered-write case: slots two 64 KiB blocks apart, so each is a run of its own. */
const CHAIN_DISK_MIB = 64;
const CHAIN_SLOTS = 256;
const CHAIN_STRIDE = 128 * 1024;

// ---------------------------------------------------------------- skip

function runs(cmd: string, args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (loop devices, mount, tracefs)';
  const tools: [string, string[], string][] = [
    ['losetup', ['--version'], 'util-linux'], ['blockdev', ['--version'], 'util-linux'], ['mount', ['--version'], 'mount'],
    ['umount', ['--version'], 'mount'], ['mkfs.ext4', ['-V'], 'e2fsprogs'], ['e2fsck', ['-V'], 'e2fsprogs'],
  ];
  for (const [tool, args, pkg] of tools) if (!runs(tool, args)) return `needs ${tool} (${pkg})`;
  try {
    new Database(':memory:').close();
  } catch (err) {
    return `better-sqlite3 does not load: ${(err as Error).message.split('\n')[0]}`;
  }
  if (!existsSync(join(TRACING, 'instances'))) {
    if (!/\btracefs\b/.test(readFileSync('/proc/filesystems', 'utf8'))) return 'the kernel has no tracefs';
    // What the agent would do itself; a kernel API mount, left in place.
    if (!runs('mount', ['-t', 'tracefs', 'nodev', TRACING])) return `tracefs cannot be mounted at ${TRACING}`;
  }
  if (!existsSync(join(TRACING, 'events/block/block_bio_queue'))) return 'no block tracepoints in tracefs (events/block/block_bio_queue)';
  const probe = join(TRACING, 'instances', `tmtest-probe-${process.pid}`);
  try {
    mkdirSync(probe);
    rmdirSync(probe);
  } catch (err) {
    return `cannot create a tracefs instance: ${(err as Error).message}`;
  }
  return undefined;
}

function partitionSkipReason(): string | undefined {
  if (!runs('partx', ['--version']) && !runs('sfdisk', ['--version'])) return 'needs partx (util-linux) or sfdisk (fdisk) for partition nodes';
  return undefined;
}

const skip = skipReason();
if (skip) console.log(`# native-tests/continuous: skipped: ${skip}`);

// ---------------------------------------------------------------- processes, mounts, loop devices

function sh(cmd: string, args: string[], input?: string): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'], input });
  } catch (err) {
    const e = err as { status?: number; stderr?: string; stdout?: string };
    const output = `${e.stdout ?? ''}${e.stderr ?? ''}`.trim() || (err as Error).message;
    throw new Error(`${cmd} ${args.join(' ')} failed (exit ${e.status}): ${output}`);
  }
}

function mountPoints(): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter(Boolean)
    .map((line) => line.split(' ')[4]!.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
}

function isBlockDevice(path: string): boolean {
  try {
    return statSync(path).isBlockDevice();
  } catch {
    return false;
  }
}

/** Backing file of a loop device, or undefined when it is not attached. */
function loopBackingFile(device: string): string | undefined {
  try {
    return readFileSync(`/sys/block/${basename(device)}/loop/backing_file`, 'utf8').trim().replace(/ \(deleted\)$/, '');
  } catch {
    return undefined;
  }
}

function tidemarkInstances(): string[] {
  try {
    return readdirSync(join(TRACING, 'instances')).filter((n) => n.startsWith('tidemark-'));
  } catch {
    return [];
  }
}

function exitOf(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

async function stopProcess(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM', graceMs = 20_000) {
  const exited = exitOf(child);
  if (child.exitCode === null && child.signalCode === null) {
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
    try {
      return await exited;
    } finally {
      clearTimeout(timer);
    }
  }
  return exited;
}

/**
 * Everything one case creates, undone in reverse order on every path: processes (by pid),
 * mounts, loop devices (only while still attached to our image), tracefs instances our
 * agents left behind, the temp dir (only when nothing is mounted below it).
 */
class Lab {
  readonly dir: string;
  private readonly steps: { what: string; run: () => unknown }[] = [];
  private done = false;

  constructor(readonly name: string) {
    this.dir = tempDir(`tidemark-native-${name}-`);
    const dir = this.dir;
    this.defer(`remove ${dir}`, () => {
      const busy = mountPoints().filter((m) => m === dir || m.startsWith(`${dir}/`));
      if (busy.length > 0) throw new Error(`not removing ${dir}: still mounted: ${busy.join(', ')}`);
      rmSync(dir, { recursive: true, force: true });
    });
  }

  defer(what: string, run: () => unknown): void {
    this.steps.push({ what, run });
  }

  async cleanup(): Promise<string[]> {
    if (this.done) return [];
    this.done = true;
    const errors: string[] = [];
    for (let step = this.steps.pop(); step; step = this.steps.pop()) {
      try {
        await step.run();
      } catch (err) {
        errors.push(`${step.what}: ${(err as Error).message}`);
      }
    }
    return errors;
  }

  track(child: ChildProcess, what: string): void {
    this.defer(`stop ${what} (pid ${child.pid})`, () => stopProcess(child, 'SIGTERM', 10_000));
  }

  attach(image: string, partitions = false): string {
    const device = attachLoop(image, { partitions });
    const backing = realpathSync(image);
    this.defer(`detach ${device}`, () => this.detach(device, backing));
    return device;
  }

  /** A new zero-filled image of `sizeBytes` in the lab, attached; `image` is its file (to resize it). */
  attachBlank(sizeBytes: number): { image: string; device: string } {
    const image = join(this.dir, 'source.img');
    writeFileSync(image, '');
    truncateSync(image, sizeBytes);
    return { image, device: this.attach(image) };
  }

  /** Detaches the device if it is still attached to `backing` (never someone else's device). */
  detach(device: string, backing: string): void {
    if (loopBackingFile(device) !== backing) return;
    sh('losetup', ['-d', device]);
  }

  mount(device: string, dir: string): void {
    mkdirSync(dir, { recursive: true });
    sh('mount', [device, dir]);
    this.defer(`unmount ${dir}`, () => this.unmount(dir));
  }

  async unmount(dir: string): Promise<void> {
    for (let attempt = 1; mountPoints().includes(dir); attempt++) {
      try {
        sh('umount', [dir]);
      } catch (err) {
        if (attempt >= 10) throw err;
        await sleep(300);
      }
    }
  }
}

// ---------------------------------------------------------------- the protected disk

interface SourceDisk {
  image: string;
  loop: string;
  /** What the agent protects: the loop device, or its first partition. */
  device: string;
  mnt: string;
}

/** One primary Linux partition from 1 MiB to the end: sfdisk when installed, else a hand-made MBR. */
function writePartitionTable(image: string, sizeBytes: number): void {
  if (runs('sfdisk', ['--version'])) {
    sh('sfdisk', ['--quiet', image], 'label: dos\nstart=2048, type=83\n');
    return;
  }
  const mbr = Buffer.alloc(512);
  mbr.writeUInt32LE(0x7d3e0001, 440); // disk signature
  const entry = 446;
  mbr.writeUInt8(0x00, entry); // not bootable
  mbr.set([0xfe, 0xff, 0xff], entry + 1); // CHS: use LBA
  mbr.writeUInt8(0x83, entry + 4); // Linux
  mbr.set([0xfe, 0xff, 0xff], entry + 5);
  mbr.writeUInt32LE(2048, entry + 8);
  mbr.writeUInt32LE(sizeBytes / 512 - 2048, entry + 12);
  mbr.writeUInt16LE(0xaa55, 510);
  const fd = openSync(image, 'r+');
  try {
    writeSync(fd, mbr, 0, 512, 0);
  } finally {
    closeSync(fd);
  }
}

/** /dev/loopNp1, appearing by itself (losetup -P) or after `partx -a` (see DESIGN §3). */
async function partitionNode(loop: string): Promise<string> {
  const node = `${loop}p1`;
  for (let i = 0; i < 10 && !isBlockDevice(node); i++) await sleep(100);
  if (!isBlockDevice(node)) {
    // partx -a on a device whose partition exists already fails; only when missing.
    sh('partx', ['-a', loop]);
    for (let i = 0; i < 20 && !isBlockDevice(node); i++) await sleep(100);
  }
  if (!isBlockDevice(node)) throw new Error(`${node} did not appear (losetup -P, partx -a ${loop})`);
  const start = readFileSync(`/sys/class/block/${basename(node)}/start`, 'utf8').trim();
  assert.equal(start, '2048', `${node} should start at sector 2048`);
  return node;
}

async function makeSourceDisk(lab: Lab, sizeMiB: number, partitioned = false): Promise<SourceDisk> {
  const image = join(lab.dir, 'source.img');
  const fd = openSync(image, 'w');
  try {
    ftruncateSync(fd, sizeMiB * MiB);
  } finally {
    closeSync(fd);
  }
  if (partitioned) writePartitionTable(image, sizeMiB * MiB);
  const loop = lab.attach(image, partitioned);
  const device = partitioned ? await partitionNode(loop) : loop;
  // 4 KiB blocks = one record per block; no lazy init, so nothing writes behind our back.
  sh('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0', device]);
  const mnt = join(lab.dir, 'source-mnt');
  lab.mount(device, mnt);
  return { image, loop, device, mnt };
}

/** Resets a process's peak resident size to its current one (Linux ≥ 4.0) and returns that. */
function resetPeakRss(pid: number): number {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
  return readPeakRssBytes(pid)!;
}

/** Writes `bytes` of random data to a new file and fsyncs it. */
function writeRandomFile(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  try {
    for (let done = 0; done < bytes; done += 8 * MiB) writeSync(fd, randomBytes(Math.min(8 * MiB, bytes - done)));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Writes `data` at `offset` of a device and fsyncs it; returns when (test clock). */
function writeDevice(device: string, offset: number, data: Buffer): number {
  const fd = openSync(device, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return Date.now();
}

/** SHA-256 of a block device as the disk holds it (drop its page cache first). */
async function sha256Device(device: string): Promise<string> {
  sh('blockdev', ['--flushbufs', device]);
  return sha256File(device);
}

// ---------------------------------------------------------------- agent and workload processes

interface PointLine {
  event: 'point';
  pointId: number;
  time: string;
  crashConsistent: boolean;
  tracker?: string;
  mode?: string;
  /** When the line arrived (test clock). */
  receivedMs: number;
  /** Which agent process printed it (1, 2 ... within a case). */
  run: number;
  [key: string]: unknown;
}

/** A running `tidemark-agent run` (continuous, JSON lines) and the points it printed. */
class AgentRun {
  readonly points: PointLine[];
  instance?: string;
  private readonly child: ChildProcess;
  private readonly stderrLines: string[] = [];
  private exitInfo?: { code: number | null; signal: NodeJS.Signals | null };
  private readonly waiters = new Set<() => boolean>();
  private readonly instancesBefore: Set<string>;

  constructor(lab: Lab, readonly stateDir: string, readonly disks: string[], readonly run: number, sharedPoints: PointLine[] = []) {
    this.points = sharedPoints;
    this.instancesBefore = new Set(tidemarkInstances());
    // Deferred before the process: cleanup runs in reverse, so this comes after the stop.
    lab.defer(`remove the tracefs instance agent run ${run} left`, () => {
      // Only an instance we saw this agent create (or take over), and only once it is dead.
      if (this.instance && existsSync(join(TRACING, 'instances', this.instance)) && this.exited) {
        rmdirSync(join(TRACING, 'instances', this.instance));
      }
    });
    this.child = spawnCli('agent', ['run', '--state', stateDir, ...disks.flatMap((d) => ['--disk', d]),
      '--interval', INTERVAL, '--tracker', 'tracefs', '--json'], { TIDEMARK_LOG_LEVEL: 'info' });
    lab.track(this.child, `agent run ${run}`);
    let out = '';
    this.child.stdout!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      let nl: number;
      while ((nl = out.indexOf('\n')) >= 0) {
        const line = out.slice(0, nl).trim();
        out = out.slice(nl + 1);
        if (!line.startsWith('{')) continue;
        let event: { event?: string };
        try {
          event = JSON.parse(line) as { event?: string };
        } catch {
          continue;
        }
        if (event.event !== 'point') continue;
        const point = { ...event, receivedMs: Date.now(), run } as PointLine;
        this.points.push(point);
        if (this.instance === undefined) {
          const created = tidemarkInstances().filter((n) => !this.instancesBefore.has(n));
          if (created.length === 1) this.instance = created[0];
        }
        this.notify();
      }
    });
    let err = '';
    this.child.stderr!.on('data', (chunk: Buffer) => {
      err += chunk.toString();
      const lines = err.split('\n');
      err = lines.pop()!;
      this.stderrLines.push(...lines.filter(Boolean));
      if (this.stderrLines.length > 40) this.stderrLines.splice(0, this.stderrLines.length - 40);
    });
    void exitOf(this.child).then((info) => {
      this.exitInfo = info;
      this.notify();
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  get exited(): boolean {
    return this.child.exitCode !== null || this.child.signalCode !== null;
  }

  get instancePath(): string | undefined {
    return this.instance && join(TRACING, 'instances', this.instance);
  }

  private notify(): void {
    for (const check of [...this.waiters]) check();
  }

  stderrTail(lines = 12): string {
    return this.stderrLines.slice(-lines).join('\n');
  }

  describePoints(): string {
    return this.points.map((p) => `${p.pointId}@${p.time.slice(11, 23)}${p.crashConsistent ? '' : '!'}:${p.mode ?? '?'}`).join(' ');
  }

  /** The first point (of this run) that satisfies pred; fails on timeout or when the agent exits. */
  waitForPoint(pred: (p: PointLine) => boolean, timeoutMs: number, what: string): Promise<PointLine> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        const found = this.points.find((p) => p.run === this.run && pred(p));
        if (found) {
          done();
          resolve(found);
          return true;
        }
        if (this.exitInfo) {
          done();
          reject(new Error(`agent exited (code ${this.exitInfo.code}, signal ${this.exitInfo.signal}) while waiting for ${what}; stderr:\n${this.stderrTail()}`));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no ${what} within ${timeoutMs / 1000} s; points: ${this.describePoints()}; agent stderr:\n${this.stderrTail()}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      if (!check()) this.waiters.add(check);
    });
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM') {
    return stopProcess(this.child, signal);
  }

  /** How the agent ended by itself within the time; fails if it did not. */
  async exitWithin(timeoutMs: number, what: string): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    await this.waitForPoint(() => false, timeoutMs, what).catch((err) => {
      if (!this.exitInfo) throw err;
    });
    return this.exitInfo!;
  }
}

/** native-tests/workload.js as a child process. */
class Workload {
  readonly log: string;
  readonly dbLog: string;
  readonly startedMs = Date.now();
  readonly done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>;
  private readonly child: ChildProcess;

  /** `dir`: a mounted filesystem to load; `device`: a block device for `--mode chain`. */
  constructor(lab: Lab, target: { dir: string } | { device: string }, seconds: number, extra: string[] = [], name = 'workload') {
    this.log = join(lab.dir, `${name}.log`);
    this.dbLog = join(lab.dir, `${name}.db.log`);
    const where = 'dir' in target ? ['--dir', target.dir] : ['--device', target.device];
    this.child = spawn(process.execPath, [WORKLOAD, ...where, '--log', this.log, '--db-log', this.dbLog, '--seconds', String(seconds), ...extra], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    lab.track(this.child, name);
    let stdout = '';
    let stderr = '';
    this.child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    this.child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    this.done = exitOf(this.child).then((r) => ({ ...r, stdout, stderr }));
  }

  async finished(): Promise<void> {
    const r = await this.done;
    assert.equal(r.code, 0, `workload failed (code ${r.code}, signal ${r.signal}): ${r.stderr.trim()}`);
  }

  stop() {
    return stopProcess(this.child);
  }

  /** fsync-return time (ms) of each record, indexed by record number. */
  recordTimes(): number[] {
    return existsSync(this.log) ? parseLog(readFileSync(this.log, 'utf8')) : [];
  }

  /** COMMIT-return time (ms) of each transaction, indexed by its number (1-based). */
  transactionTimes(): number[] {
    return existsSync(this.dbLog) ? parseLog(readFileSync(this.dbLog, 'utf8')) : [];
  }
}

// ---------------------------------------------------------------- checks

/** Count of leading entries (from `first`) whose time is before cutMs: what must be in the point. */
function committedBefore(times: number[], cutMs: number, first: number): number {
  let n = first;
  while (times[n] !== undefined && times[n]! < cutMs) n++;
  return n - first;
}

function iso(ms: number | undefined): string {
  return ms === undefined ? '?' : new Date(ms).toISOString();
}

function checkRecords(mnt: string, point: PointLine, times: number[]): string {
  const cutMs = Date.parse(point.time);
  const label = `point ${point.pointId} (cut ${point.time})`;
  const path = join(mnt, 'records.dat');
  const data = existsSync(path) ? readFileSync(path) : Buffer.alloc(0);
  const slots = Math.floor(data.length / RECORD_BYTES);
  const slot = (i: number) => data.subarray(i * RECORD_BYTES, (i + 1) * RECORD_BYTES);
  let present = 0;
  while (present < slots && parseRecord(slot(present)) === present) present++;
  for (let i = present; i < slots; i++) {
    const n = parseRecord(slot(i));
    assert.equal(n, undefined, `${label}: records.dat slot ${i} holds record ${n}, but the valid records stop at ${present}: a gap`);
  }
  assert.equal(data.length, present * RECORD_BYTES,
    `${label}: records.dat is ${data.length} bytes but only the first ${present} records are intact (slot ${present} is torn or stale)`);
  const mustHave = committedBefore(times, cutMs, 0);
  assert.ok(present >= mustHave,
    `${label}: ${mustHave} records were fsynced before the cut, only ${present} are present (record ${present} fsynced at ${iso(times[present])})`);
  if (present >= 2 && times[present - 2] !== undefined) {
    // Record k is written only after the fsync of record k-1 returned.
    assert.ok(times[present - 2]! <= cutMs,
      `${label}: record ${present - 1} is present, but it was written after ${iso(times[present - 2])} (fsync of record ${present - 2}), later than the cut`);
  }
  return `${present} records (${mustHave} required)`;
}

function checkSqlite(lab: Lab, mnt: string, point: PointLine, times: number[]): string {
  const cutMs = Date.parse(point.time);
  const label = `point ${point.pointId} (cut ${point.time})`;
  const mustHave = committedBefore(times, cutMs, 1);
  if (!existsSync(join(mnt, 'db.sqlite'))) {
    assert.equal(mustHave, 0, `${label}: db.sqlite is missing though ${mustHave} transactions committed before the cut`);
    return 'no database yet';
  }
  // Check a copy: the restored filesystem stays as the point left it, for e2fsck.
  const copyDir = mkdtempSync(join(lab.dir, 'sqlite-'));
  try {
    for (const suffix of ['', '-wal', '-journal']) {
      if (existsSync(join(mnt, `db.sqlite${suffix}`))) copyFileSync(join(mnt, `db.sqlite${suffix}`), join(copyDir, `db.sqlite${suffix}`));
    }
    const db = new Database(join(copyDir, 'db.sqlite'));
    try {
      assert.equal(db.pragma('integrity_check', { simple: true }), 'ok', `${label}: PRAGMA integrity_check`);
      const hasCounter = db.prepare(`SELECT count(*) FROM sqlite_schema WHERE name IN ('counter', 'rows')`).pluck().get() === 2;
      const counter = hasCounter ? ((db.prepare('SELECT n FROM counter WHERE id = 1').pluck().get() as number | undefined) ?? 0) : 0;
      const rows = hasCounter ? (db.prepare('SELECT count(*) FROM rows').pluck().get() as number) : 0;
      assert.equal(rows, counter, `${label}: ${rows} rows but the counter says ${counter}: a transaction is half in`);
      assert.ok(counter >= mustHave, `${label}: ${mustHave} transactions committed before the cut, the database holds ${counter}`);
      if (counter >= 2 && times[counter - 1] !== undefined) {
        assert.ok(times[counter - 1]! <= cutMs,
          `${label}: transaction ${counter} is in, but it began after ${iso(times[counter - 1])} (commit of ${counter - 1}), later than the cut`);
      }
      return `${counter} transactions (${mustHave} required), integrity ok`;
    } finally {
      db.close();
    }
  } finally {
    rmSync(copyDir, { recursive: true, force: true });
  }
}

interface CaseContext {
  t: TestContext;
  lab: Lab;
  host: string;
  disk: SourceDisk;
  workload: Workload;
}

/**
 * Restores a point to an image, attaches and mounts it (ext4 replays its journal), checks
 * the records and the database, unmounts, detaches, runs e2fsck -fn. With expectSha, the
 * restored image must first equal that digest byte for byte.
 */
async function checkPoint(d: Deployment, c: CaseContext, point: PointLine, expectSha?: string): Promise<void> {
  assert.equal(point.crashConsistent, true, `point ${point.pointId} is not crash-consistent`);
  const image = join(c.lab.dir, `restored-${point.pointId}.img`);
  const restored = await d.restore(c.host, c.disk.device, point.pointId, image);
  assert.equal(restored.point, point.pointId);
  if (expectSha) assert.equal(await sha256File(image), expectSha, `point ${point.pointId} differs from the source device ${c.disk.device}`);
  const loop = c.lab.attach(image);
  const backing = realpathSync(image);
  const mnt = join(c.lab.dir, `restored-${point.pointId}-mnt`);
  let summary: string;
  try {
    c.lab.mount(loop, mnt);
    try {
      summary = `${checkRecords(mnt, point, c.workload.recordTimes())}; ${checkSqlite(c.lab, mnt, point, c.workload.transactionTimes())}`;
    } finally {
      await c.lab.unmount(mnt);
    }
  } finally {
    c.lab.detach(loop, backing);
  }
  sh('e2fsck', ['-fn', image]); // throws with e2fsck's report unless clean
  rmSync(image, { force: true });
  rmSync(mnt, { recursive: true, force: true });
  c.t.diagnostic(`point ${point.pointId} (${point.mode ?? '?'}, cut ${point.time}): ${summary}; e2fsck clean${expectSha ? '; equals the device' : ''}`);
}

/** Up to n items evenly spread over the list, the last one included. */
function spread<T>(items: T[], n: number): T[] {
  if (items.length <= n) return [...items];
  const picked = new Set<number>();
  for (let i = 0; i < n; i++) picked.add(Math.round(((items.length - 1) * (i + 1)) / n));
  for (let i = 0; picked.size < n; i++) picked.add(i);
  return [...picked].sort((a, b) => a - b).map((i) => items[i]!);
}

function assertPointShape(p: PointLine): void {
  assert.equal(typeof p.pointId, 'number', `point line without pointId: ${JSON.stringify(p)}`);
  assert.ok(Number.isFinite(Date.parse(p.time)), `point ${p.pointId}: bad time ${p.time}`);
  assert.equal(typeof p.crashConsistent, 'boolean', `point ${p.pointId}: crashConsistent`);
  assert.equal(p.tracker, 'tracefs', `point ${p.pointId}: tracker (--tracker tracefs): ${JSON.stringify(p)}`);
  assert.ok(MODES.includes(p.mode!), `point ${p.pointId}: mode ${p.mode} is not one of ${MODES.join('/')}`);
}

/**
 * The end of a case: the load has stopped; unmount the source (its last writes), let the
 * agent commit a point cut after that, SIGTERM it (exit 0, its tracefs instance removed),
 * then the newest point must equal the device byte for byte (and pass the mount checks).
 */
async function finish(d: Deployment, c: CaseContext, agent: AgentRun): Promise<PointLine> {
  await c.workload.finished();
  await c.lab.unmount(c.disk.mnt);
  const unmountedMs = Date.now();
  try {
    await agent.waitForPoint((p) => Date.parse(p.time) > unmountedMs, 20_000, 'point cut after the source was unmounted');
  } catch (err) {
    // An agent may skip points when nothing changed; the byte comparison below still decides.
    c.t.diagnostic(`no point cut after the unmount: ${(err as Error).message.split('\n')[0]}`);
  }
  const instance = agent.instancePath;
  const exit = await agent.stop('SIGTERM');
  assert.deepEqual(exit, { code: 0, signal: null }, `agent after SIGTERM; stderr:\n${agent.stderrTail()}`);
  if (instance) assert.ok(!existsSync(instance), `the agent left its tracefs instance ${instance} behind`);
  else c.t.diagnostic('could not tell which tracefs instance the agent created (another agent running?)');
  for (const p of agent.points) assertPointShape(p);
  const newest = agent.points.at(-1)!;
  assert.ok(Date.parse(newest.time) >= c.workload.startedMs, 'no point after the load started');
  await checkPoint(d, c, newest, await sha256Device(c.disk.device));
  return newest;
}

/**
 * Crash-consistent points cut while the load ran (after `fromMs`, between the first and the
 * last record's fsync), spread over that window; `runs` limits them to some agent processes.
 */
function loadPoints(agent: AgentRun, workload: Workload, fromMs: number, n: number, t: TestContext, runs?: number[]): PointLine[] {
  const times = workload.recordTimes().filter((ms) => ms !== undefined);
  const startMs = Math.max(fromMs, times[0] ?? Infinity);
  const endMs = times.at(-1) ?? -Infinity;
  const during = agent.points.filter((p) => Date.parse(p.time) > startMs && Date.parse(p.time) <= endMs && (!runs || runs.includes(p.run)));
  const consistent = during.filter((p) => p.crashConsistent);
  const modes = during.reduce<Record<string, number>>((m, p) => ({ ...m, [p.mode ?? '?']: (m[p.mode ?? '?'] ?? 0) + 1 }), {});
  t.diagnostic(`${during.length} points cut under load, ${consistent.length} crash-consistent; modes ${JSON.stringify(modes)}; all: ${agent.describePoints()}`);
  return spread(consistent, n);
}

async function agentStatus(stateDir: string): Promise<{ state: string; reason: string | null; tracker: string; lagSeconds: number | null; backlogBytes: number }> {
  return runJson('agent', ['status', '--state', stateDir]);
}

// ---------------------------------------------------------------- the cases

describe('continuous replication with tracefs under an fsync load', { skip, concurrency: false }, () => {
  let d: Deployment;
  const labs: Lab[] = [];

  /** Runs one case in its own lab (temp dir, loop devices, processes), cleaned up whatever happens. */
  async function inLab(name: string, body: (lab: Lab) => Promise<void>, t: TestContext): Promise<void> {
    const lab = new Lab(name);
    labs.push(lab);
    try {
      await body(lab);
    } finally {
      const errors = await lab.cleanup();
      if (errors.length > 0) t.diagnostic(`cleanup: ${errors.join('; ')}`);
    }
  }

  async function startCase(t: TestContext, lab: Lab, host: string, sizeMiB: number, partitioned = false) {
    const disk = await makeSourceDisk(lab, sizeMiB, partitioned);
    const stateDir = await d.enroll(host);
    const agent = new AgentRun(lab, stateDir, [disk.device], 1);
    const initial = await agent.waitForPoint(() => true, 60_000, 'initial point');
    t.diagnostic(`${host}: initial point ${initial.pointId} (${initial.mode}) on ${disk.device}; tracefs instance ${agent.instance ?? '?'}`);
    return { disk, stateDir, agent };
  }

  before(async () => {
    d = await Deployment.start();
  });

  after(async () => {
    for (const lab of labs) {
      const errors = await lab.cleanup();
      if (errors.length > 0) console.log(`# cleanup ${lab.name}: ${errors.join('; ')}`);
    }
    await d?.close();
  });

  it('ext4 on a loop device: every crash-consistent point under the load checks out; the last equals the disk', { timeout: 240_000 }, async (t) => {
    await inLab('loop', async (lab) => {
      const host = 'cont-loop';
      const { disk, stateDir, agent } = await startCase(t, lab, host, 128);
      const workload = new Workload(lab, { dir: disk.mnt }, 16);
      const c: CaseContext = { t, lab, host, disk, workload };
      await agent.waitForPoint((p) => Date.parse(p.time) > workload.startedMs + 5000, 20_000, 'point 5 s into the load');
      const status = await agentStatus(stateDir);
      t.diagnostic(`status under load: ${JSON.stringify(status)}`);
      assert.equal(status.tracker, 'tracefs');
      assert.ok(['Replicating', 'Resyncing'].includes(status.state), `state under load: ${status.state} (${status.reason})`);
      assert.ok(status.lagSeconds !== null && status.lagSeconds < 15, `lag under load: ${status.lagSeconds} s`);
      const newest = await finish(d, c, agent);
      const points = loadPoints(agent, workload, workload.startedMs, Infinity, t);
      assert.ok(agent.points.some((p) => p.mode === 'incremental'), 'no incremental (tracefs) point at all');
      for (const p of points) await checkPoint(d, c, p);
      t.diagnostic(`checked ${points.length + 1} points, newest ${newest.pointId}`);
      assert.ok(points.length >= 4, `need at least 4 crash-consistent points under load (plus the last), got ${points.length}`);
    }, t);
  });

  it('ext4 on a partition of a partitioned loop device: every crash-consistent point under the load checks out', { timeout: 200_000, skip: partitionSkipReason() }, async (t) => {
    await inLab('part', async (lab) => {
      const host = 'cont-part';
      const { disk, agent } = await startCase(t, lab, host, 96, true);
      const workload = new Workload(lab, { dir: disk.mnt }, 10);
      const c: CaseContext = { t, lab, host, disk, workload };
      await finish(d, c, agent);
      const points = loadPoints(agent, workload, workload.startedMs, Infinity, t);
      for (const p of points) await checkPoint(d, c, p);
      assert.ok(points.length >= 4, `need at least 4 crash-consistent points under load (plus the last), got ${points.length}`);
    }, t);
  });

  it('ordered writes straight to the device: every crash-consistent point holds a prefix of them', { timeout: 150_000 }, async (t) => {
    await inLab('chain', async (lab) => {
      const host = 'cont-chain';
      const image = join(lab.dir, 'source.img');
      writeFileSync(image, '');
      truncateSync(image, CHAIN_DISK_MIB * MiB);
      const device = lab.attach(image);
      const agent = new AgentRun(lab, await d.enroll(host), [device], 1);
      await agent.waitForPoint(() => true, 60_000, 'initial point');
      const workload = new Workload(lab, { device }, 15, ['--mode', 'chain', '--slots', String(CHAIN_SLOTS), '--stride', String(CHAIN_STRIDE)]);
      await workload.finished();
      const loadEndMs = Date.now();
      await agent.waitForPoint((p) => Date.parse(p.time) > loadEndMs, 20_000, 'point cut after the load');
      assert.deepEqual(await agent.stop('SIGTERM'), { code: 0, signal: null }, `agent after SIGTERM; stderr:\n${agent.stderrTail()}`);
      const during = agent.points.filter((p) => p.mode === 'incremental' && Date.parse(p.time) > workload.startedMs && Date.parse(p.time) < loadEndMs);
      const consistent = during.filter((p) => p.crashConsistent);
      t.diagnostic(`${during.length} points cut under load, ${consistent.length} crash-consistent: ${agent.describePoints()}`);
      // Every one of them: a round wrongly called clean shows up as a hole in the chain.
      let previous = -1;
      const newest = agent.points.at(-1)!;
      for (const p of [...consistent, newest]) {
        const restored = join(lab.dir, `restored-${p.pointId}.img`);
        await d.restore(host, device, p.pointId, restored);
        const held = chainSlots(readFileSync(restored), CHAIN_SLOTS, CHAIN_STRIDE);
        if (p === newest) assert.equal(await sha256File(restored), await sha256Device(device), `point ${p.pointId} differs from ${device}`);
        rmSync(restored);
        const gap = chainGap(held);
        assert.equal(gap, null, `point ${p.pointId} (cut ${p.time}) is flagged crash-consistent but is not a state the device was in: ${gap}`);
        const m = newestChainWrite(held);
        assert.ok(m >= previous, `point ${p.pointId} holds writes up to ${m}, an earlier point up to ${previous}`);
        previous = m;
      }
      assert.ok(consistent.length >= 5, `need at least 5 crash-consistent points under load, got ${consistent.length}`);
      t.diagnostic(`checked ${consistent.length + 1} points; the newest holds writes 0..${previous}`);
    }, t);
  });

  it('SIGKILL and restart of the agent mid-load: the next points are still correct', { timeout: 150_000 }, async (t) => {
    await inLab('kill', async (lab) => {
      const host = 'cont-kill';
      const { disk, stateDir, agent: first } = await startCase(t, lab, host, 64);
      const workload = new Workload(lab, { dir: disk.mnt }, 16);
      const c: CaseContext = { t, lab, host, disk, workload };
      const third = await first.waitForPoint((p) => Date.parse(p.time) > workload.startedMs + 3000, 20_000, 'point 3 s into the load');
      const instance = first.instancePath;
      assert.deepEqual(await first.stop('SIGKILL'), { code: null, signal: 'SIGKILL' });
      const killedMs = Date.now();
      // Killed inside a read of events (SPEC §8.2 flag), it may have lost events it took from the kernel.
      const flag = join(stateDir, 'tracefs.reading');
      const killedReading = existsSync(flag) && readFileSync(flag, 'utf8').trim() === '1';
      t.diagnostic(`killed the agent after point ${third.pointId}${killedReading ? ', while it read events' : ''}; instance ${instance ?? '?'} ${instance && existsSync(instance) ? 'survives' : 'is gone'}`);
      await sleep(1500); // writes the dead agent does not see, buffered by the surviving instance
      const second = new AgentRun(lab, stateDir, [disk.device], 2, first.points);
      second.instance = first.instance;
      const resumed = await second.waitForPoint(() => true, 60_000, 'first point after the restart');
      t.diagnostic(`after restart: point ${resumed.pointId} mode ${resumed.mode}, consistent ${resumed.crashConsistent}`);
      assert.notEqual(resumed.mode, 'initial', 'a restart must not redo the initial sync');
      if (instance && existsSync(instance) && killedReading) {
        assert.equal(resumed.mode, 'resync', 'killed while reading events (tracefs.reading = 1): events it took may be lost, so it must rescan');
      } else if (instance && existsSync(instance)) {
        // Issue 3: killed and restarted while its instance survived → resume from the buffered events.
        assert.notEqual(resumed.mode, 'resync', 'the instance survived the kill: the restarted agent should resume from its buffered events, not rescan');
      }
      await second.waitForPoint((p) => Date.parse(p.time) > killedMs + 5000, 30_000, 'point 5 s after the restart');
      await finish(d, c, second);
      const points = loadPoints(second, workload, killedMs, 3, t, [2]);
      // The first consistent point after the restart spans the kill window: always check it.
      const firstConsistent = second.points.find((p) => p.run === 2 && p.crashConsistent && p !== second.points.at(-1));
      for (const p of firstConsistent && !points.includes(firstConsistent) ? [firstConsistent, ...points] : points) await checkPoint(d, c, p);
      assert.ok(points.length >= 2, `need at least 2 crash-consistent points after the restart under load, got ${points.length}`);
    }, t);
  });

  it('a host rolled back with its agent state: the agent finds its hashes older than the receiver, resyncs, and the next point is the device as it is', { timeout: 150_000 }, async (t) => {
    await inLab('rollback', async (lab) => {
      const host = 'cont-rollback';
      const { device } = lab.attachBlank(16 * MiB);
      const writeBlock = (data: Buffer) => writeDevice(device, 3 * 64 * 1024, data);
      const older = randomBytes(64 * 1024);
      writeBlock(older);
      const stateDir = await d.enroll(host);
      const first = new AgentRun(lab, stateDir, [device], 1);
      await first.waitForPoint(() => true, 60_000, 'initial point');
      // Killed between cycles (the point line comes after the commit is recorded): the tracefs instance survives.
      await first.stop('SIGKILL');
      const backup = join(lab.dir, 'state-backup');
      cpSync(stateDir, backup, { recursive: true });

      const second = new AgentRun(lab, stateDir, [device], 2, first.points);
      second.instance = first.instance;
      const newerMs = writeBlock(randomBytes(64 * 1024));
      await second.waitForPoint((p) => Date.parse(p.time) > newerMs, 30_000, 'a point holding the newer block');
      await second.stop('SIGKILL');

      // The rollback: state and device as they were at the backup.
      rmSync(stateDir, { recursive: true });
      cpSync(backup, stateDir, { recursive: true });
      const rolledBackMs = writeBlock(older);
      const third = new AgentRun(lab, stateDir, [device], 3, first.points);
      third.instance = first.instance;
      const point = await third.waitForPoint((p) => Date.parse(p.time) > rolledBackMs, 60_000, 'first point after the rollback');
      t.diagnostic(`after the rollback: point ${point.pointId} mode ${point.mode}; ${third.stderrTail(40).includes('not the one this state last committed') ? 'the agent found its state older than the receiver' : 'the agent rescanned for another reason'}`);
      assert.deepEqual(await third.stop('SIGTERM'), { code: 0, signal: null }, `agent after SIGTERM; stderr:\n${third.stderrTail()}`);
      assert.match((await agentStatus(stateDir)).reason ?? '', /the agent was stopped/, 'status says the agent is not running');
      const restored = join(lab.dir, `restored-${point.pointId}.img`);
      await d.restore(host, device, point.pointId, restored);
      assert.equal(await sha256File(restored), await sha256Device(device), `point ${point.pointId} is not the device as it is: it kept the newer block`);
    }, t);
  });

  it('an agent stopped with SIGTERM removes its tracefs instance; the next run says why it resyncs (not "first start or reboot")', { timeout: 120_000 }, async (t) => {
    await inLab('sigterm-restart', async (lab) => {
      const host = 'cont-sigterm';
      const { device } = lab.attachBlank(16 * MiB);
      const stateDir = await d.enroll(host);
      const first = new AgentRun(lab, stateDir, [device], 1);
      await first.waitForPoint(() => true, 60_000, 'initial point');
      assert.deepEqual(await first.stop('SIGTERM'), { code: 0, signal: null }, `agent after SIGTERM; stderr:\n${first.stderrTail()}`);
      assert.equal(existsSync(join(TRACING, 'instances', first.instance!)), false, 'the instance is removed when run stops');
      const second = new AgentRun(lab, stateDir, [device], 2, first.points);
      const startedMs = writeDevice(device, 0, randomBytes(64 * 1024));
      await second.waitForPoint((p) => Date.parse(p.time) > startedMs, 60_000, 'a point after the restart');
      const resync = second.stderrTail(40).split('\n').find((l) => l.includes('resync by hash comparison'));
      assert.ok(resync, `the restart resyncs; stderr:\n${second.stderrTail()}`);
      assert.doesNotMatch(resync, /first start or reboot/, resync);
      assert.match(resync, /the agent was stopped/, resync);
      assert.deepEqual(await second.stop('SIGTERM'), { code: 0, signal: null });
    }, t);
  });

  it('a disk that grows, shrinks or goes away while tracked: tracking starts again at the new size, points match the device, size 0 stops the agent', { timeout: 180_000 }, async (t) => {
    await inLab('resize', async (lab) => {
      const host = 'cont-resize';
      const { image, device } = lab.attachBlank(16 * MiB);
      const write = (offset: number) => writeDevice(device, offset, randomBytes(64 * 1024));
      write(3 * 64 * 1024);
      const agent = new AgentRun(lab, await d.enroll(host), [device], 1);
      await agent.waitForPoint(() => true, 60_000, 'initial point');
      for (const [sizeMiB, offsets] of [[24, [20 * MiB, MiB]], [8, [2 * MiB]]] as const) {
        truncateSync(image, sizeMiB * MiB);
        sh('losetup', ['-c', device]); // the loop device takes its file's new size
        const writtenMs = Math.max(...offsets.map(write));
        const point = await agent.waitForPoint((p) => Date.parse(p.time) > writtenMs, 60_000, `a point after the resize to ${sizeMiB} MiB`);
        const listed = (await d.points(host)).find((p) => p.id === point.pointId)!;
        assert.equal(listed.disks[0].sizeBytes, sizeMiB * MiB, `point ${point.pointId} has the disk's new size`);
        const restored = join(lab.dir, `restored-${point.pointId}.img`);
        await d.restore(host, device, point.pointId, restored);
        assert.equal(await sha256File(restored), await sha256Device(device), `point ${point.pointId} (${point.mode}) is the device resized to ${sizeMiB} MiB`);
      }
      sh('losetup', ['-d', device]); // the agent holds it open: its size drops to 0 at once, the node stays
      const exit = await agent.exitWithin(60_000, 'the agent to stop on a disk of size 0');
      assert.equal(exit.code, 12, agent.stderrTail());
      assert.match(agent.stderrTail(1), /has size 0 \(a detached loop device/);
    }, t);
  });

  it('a disk forgotten on the receiver while tracked: the agent registers it again and resyncs it, and keeps going', { timeout: 150_000 }, async (t) => {
    await inLab('forget', async (lab) => {
      const host = 'cont-forget';
      const kept = lab.attachBlank(8 * MiB).device;
      const forgotten = lab.attachBlank(8 * MiB).device;
      writeDevice(forgotten, 0, randomBytes(64 * 1024));
      const agent = new AgentRun(lab, await d.enroll(host), [kept, forgotten], 1);
      await agent.waitForPoint(() => true, 60_000, 'initial point');
      const forgot = await runJson('receiver', ['forget', '--data', d.receiver.dataDir, '--host', host, '--disk', forgotten, '--json']);
      assert.deepEqual(forgot.disks, [forgotten]);
      const writtenMs = Math.max(writeDevice(kept, 64 * 1024, randomBytes(64 * 1024)), writeDevice(forgotten, 2 * 64 * 1024, randomBytes(64 * 1024)));
      const point = await agent.waitForPoint((p) => Date.parse(p.time) > writtenMs, 60_000, 'a point after the forget');
      t.diagnostic(`after the forget: point ${point.pointId} mode ${point.mode}`);
      assert.ok(!agent.exited, `the agent is still running; stderr:\n${agent.stderrTail()}`);
      const listed = (await d.points(host)).find((p) => p.id === point.pointId)!;
      assert.deepEqual(listed.disks.map((x: { name: string }) => x.name).sort(), [kept, forgotten].sort());
      for (const device of [kept, forgotten]) {
        const restored = join(lab.dir, `restored-${point.pointId}-${basename(device)}.img`);
        await d.restore(host, device, point.pointId, restored);
        assert.equal(await sha256File(restored), await sha256Device(device), `${device} at point ${point.pointId}`);
      }
    }, t);
  });

  it('a state directory removed under a running agent: one line, exit 13, and the trace instance removed', { timeout: 120_000 }, async (t) => {
    await inLab('lost-state', async (lab) => {
      const { device } = lab.attachBlank(8 * MiB);
      const stateDir = await d.enroll('cont-lost-state');
      const agent = new AgentRun(lab, stateDir, [device], 1);
      await agent.waitForPoint(() => true, 60_000, 'initial point');
      assert.ok(agent.instancePath && existsSync(agent.instancePath), 'the agent made its trace instance');
      rmSync(stateDir, { recursive: true });
      const exit = await agent.exitWithin(30_000, 'the agent to stop without its state directory');
      assert.equal(exit.code, 13, agent.stderrTail());
      assert.match(agent.stderrTail(1), /^tidemark-agent: cannot record tracked writes in the state directory .* enroll again/);
      assert.ok(!existsSync(agent.instancePath), 'the trace instance was removed');
    }, t);
  });

  it('an agent upgraded over legacy (XXH3-64) hash files resyncs against them first, ships only what changed, and later points are correct', { timeout: 150_000 }, async (t) => {
    await inLab('legacy', async (lab) => {
      const host = 'cont-legacy';
      const { disk, stateDir, agent: first } = await startCase(t, lab, host, 64);
      const workload = new Workload(lab, { dir: disk.mnt }, 16);
      const c: CaseContext = { t, lab, host, disk, workload };
      await first.waitForPoint((p) => Date.parse(p.time) > workload.startedMs + 2000, 20_000, 'point 2 s into the load');
      // SIGKILL leaves the tracefs instance with its buffered events: without the upgrade rule the
      // restarted agent would go on from them, with rounds writing XXH64 into a legacy file.
      assert.deepEqual(await first.stop('SIGKILL'), { code: null, signal: 'SIGKILL' });
      const stoppedMs = Date.now();
      // What an agent before the upgrade leaves (SPEC §7): XXH3-64 of every block of its last point, in <diskId>.shipped.
      const db = new Database(join(stateDir, 'state.db'), { readonly: true });
      const { disk_id: diskId, block_bytes: blockBytes } = db.prepare('SELECT disk_id, block_bytes FROM disk').get() as { disk_id: number; block_bytes: number };
      db.close();
      const last = first.points.at(-1)!;
      const image = join(lab.dir, `point-${last.pointId}.img`);
      await d.restore(host, disk.device, last.pointId, image);
      const content = readFileSync(image);
      rmSync(image);
      const blockCount = Math.ceil(content.length / blockBytes);
      const legacy = BigUint64Array.from({ length: blockCount }, (_, i) => xxh3.xxh64(content.subarray(i * blockBytes, (i + 1) * blockBytes)));
      const hashes = join(stateDir, 'hashes');
      writeFileSync(join(hashes, `${diskId}.shipped`), legacy);
      rmSync(join(hashes, `${diskId}.shipped.xxh64`));

      const second = new AgentRun(lab, stateDir, [disk.device], 2, first.points);
      second.instance = first.instance;
      const upgrade = await second.waitForPoint((p) => p.run === 2, 60_000, 'first point after the upgrade');
      t.diagnostic(`after the upgrade: point ${upgrade.pointId} mode ${upgrade.mode}, ${upgrade.blocksChanged} of ${blockCount} blocks changed`);
      assert.equal(upgrade.mode, 'resync', 'rounds write into the shipped hashes: legacy ones must be replaced by a hash scan first');
      assert.ok(Number(upgrade.blocksChanged) < blockCount / 2, `the scan compared with the legacy hashes, not with nothing: ${upgrade.blocksChanged} of ${blockCount} blocks shipped`);
      assert.ok(!existsSync(join(hashes, `${diskId}.shipped`)) && existsSync(join(hashes, `${diskId}.shipped.xxh64`)), `hash files after the upgrade: ${readdirSync(hashes).join(', ')}`);
      await second.waitForPoint((p) => p.run === 2 && p.mode === 'incremental', 30_000, 'a tracefs point after the upgrade');
      await finish(d, c, second);
      for (const p of loadPoints(second, workload, stoppedMs, 2, t, [2])) await checkPoint(d, c, p);
    }, t);
  });

  it('a forced trace-buffer overrun is detected, resynced, and later points are correct', { timeout: 150_000 }, async (t) => {
    await inLab('overrun', async (lab) => {
      const host = 'cont-overrun';
      const { disk, stateDir, agent } = await startCase(t, lab, host, 64);
      const workload = new Workload(lab, { dir: disk.mnt }, 18);
      const c: CaseContext = { t, lab, host, disk, workload };
      await agent.waitForPoint((p) => Date.parse(p.time) > workload.startedMs + 1500, 20_000, 'point under load');
      const instance = agent.instancePath;
      assert.ok(instance && existsSync(join(instance, 'buffer_size_kb')), `cannot find the agent's tracefs instance (${instance ?? 'none new under instances/'})`);
      const sizeFile = join(instance, 'buffer_size_kb');
      const originalKb = /^\d+/.exec(readFileSync(sizeFile, 'utf8').trim())?.[0] ?? '1408';
      const heavy = new Workload(lab, { dir: disk.mnt }, 8, ['--mode', 'bulk', '--bulk-mib', '8'], 'bulk');
      await sleep(300);
      const shrunkMs = Date.now();
      writeFileSync(sizeFile, '1\n');
      let evidence: string | undefined;
      try {
        for (let deadline = Date.now() + 15_000; !evidence && Date.now() < deadline;) {
          const resync = agent.points.find((p) => p.mode === 'resync' && p.receivedMs > shrunkMs);
          if (resync) evidence = `point ${resync.pointId} has mode resync`;
          const status = await agentStatus(stateDir);
          if (!evidence && (status.state === 'Resyncing' || /overrun|lost|drop/i.test(status.reason ?? ''))) {
            evidence = `status ${status.state}: ${status.reason}`;
          }
          if (!evidence) await sleep(250);
        }
      } finally {
        if (existsSync(sizeFile)) writeFileSync(sizeFile, `${originalKb}\n`);
        await heavy.stop();
      }
      t.diagnostic(`overrun: ${evidence ?? 'not detected'}; buffer_size_kb restored to ${originalKb}`);
      assert.ok(evidence, `the agent did not report the overrun within 15 s (no resync point, status not Resyncing, no overrun reason); points: ${agent.describePoints()}`);
      const detectedMs = Date.now();
      await agent.waitForPoint((p) => Date.parse(p.time) > detectedMs + 2000 && p.crashConsistent, 30_000, 'consistent point after the overrun');
      await finish(d, c, agent);
      const points = loadPoints(agent, workload, shrunkMs, 3, t);
      for (const p of points) await checkPoint(d, c, p);
      assert.ok(points.length >= 2, `need at least 2 crash-consistent points after the overrun under load, got ${points.length}`);
    }, t);
  });

  it('receiver SIGKILLed at random moments of the cycles under load: no change is lost', { timeout: 240_000 }, async (t) => {
    await inLab('kills', async (lab) => {
      const host = 'cont-kills';
      const { disk, agent } = await startCase(t, lab, host, 64);
      const workload = new Workload(lab, { dir: disk.mnt }, 43, ['--rate', '150']);
      const c: CaseContext = { t, lab, host, disk, workload };
      const random = makePrng(4343);
      for (let kill = 0; kill < 8; kill++) {
        // Right after a point, then somewhere in the next interval: often between a round's reads and its commit.
        const sinceMs = Date.now();
        await agent.waitForPoint((p) => p.receivedMs > sinceMs, 60_000, `point before kill ${kill + 1}`);
        await sleep(random() % 1000);
        await d.receiver.restart('SIGKILL');
      }
      await finish(d, c, agent); // the newest point equals the device byte for byte
    }, t);
  });

  it('a backlog far larger than a round may hold is shipped in bounded memory', { timeout: 240_000 }, async (t) => {
    await inLab('backlog', async (lab) => {
      const host = 'cont-backlog';
      const backlogBytes = 512 * MiB;
      const { disk, agent } = await startCase(t, lab, host, 768);
      const workload = new Workload(lab, { dir: disk.mnt }, 2);
      const c: CaseContext = { t, lab, host, disk, workload };
      await workload.finished();
      await d.receiver.stop();
      const rssBefore = resetPeakRss(agent.pid);
      writeRandomFile(join(disk.mnt, 'backlog.bin'), backlogBytes);
      await d.receiver.restart();
      const upMs = Date.now();
      const back = await agent.waitForPoint((p) => p.receivedMs > upMs, 150_000, 'point holding the backlog');
      const growth = readPeakRssBytes(agent.pid)! - rssBefore;
      t.diagnostic(`point ${back.pointId} (${back.mode}) after a ${backlogBytes / MiB} MiB backlog: peak RSS ${(growth / MiB).toFixed(0)} MiB above the ${(rssBefore / MiB).toFixed(0)} MiB before it`);
      assert.equal(back.mode, 'incremental', 'the backlog should ship as tracked changes, not a rescan');
      assert.ok(growth < backlogBytes / 2, `the agent grew by ${(growth / MiB).toFixed(0)} MiB while shipping a ${backlogBytes / MiB} MiB backlog: it holds the backlog in memory`);
      await finish(d, c, agent); // the newest point equals the device byte for byte
    }, t);
  });

  it('receiver down for 30 s under load: the agent reconnects by itself and nothing is lost', { timeout: 240_000 }, async (t) => {
    await inLab('outage', async (lab) => {
      const host = 'cont-outage';
      const { disk, stateDir, agent } = await startCase(t, lab, host, 96);
      const workload = new Workload(lab, { dir: disk.mnt }, 42, ['--rate', '150']);
      const c: CaseContext = { t, lab, host, disk, workload };
      await agent.waitForPoint((p) => Date.parse(p.time) > workload.startedMs + 2000, 20_000, 'point under load');
      await d.receiver.stop();
      const downMs = Date.now();
      await sleep(15_000);
      const during = await agentStatus(stateDir);
      t.diagnostic(`status with the receiver down: ${JSON.stringify({ state: during.state, reason: during.reason, lag: during.lagSeconds, backlog: during.backlogBytes })}`);
      await sleep(Math.max(0, downMs + 30_000 - Date.now()));
      await d.receiver.restart(); // same port
      const upMs = Date.now();
      const back = await agent.waitForPoint((p) => p.receivedMs > upMs, 90_000, 'point after the receiver came back');
      t.diagnostic(`receiver back after ${((upMs - downMs) / 1000).toFixed(1)} s; first point ${back.pointId} ${((back.receivedMs - upMs) / 1000).toFixed(1)} s later, mode ${back.mode}`);
      assert.notEqual(back.mode, 'initial', 'a receiver outage must not cause a full sync');
      await finish(d, c, agent);
      const points = loadPoints(agent, workload, upMs, 2, t);
      for (const p of points) await checkPoint(d, c, p);
    }, t);
  });
});
