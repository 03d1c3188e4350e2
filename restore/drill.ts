// Drill: prove a recovery point restores to something usable. Each disk of
// the point (or the one asked for) is restored to a sparse image in a scratch
// directory, a check command runs against it (`/bin/sh -c`, `{image}`
// replaced by the image's shell-quoted path), and its exit status and the
// tail of its output are reported. The scratch directory is removed on every
// path out, an interrupt included. Replication is not disturbed: a restore
// only reads from the receiver.
import { spawn, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import type { ReceiverConnection } from '../shared/connection.js';
import { TidemarkError } from '../shared/errors.js';
import type { PointInfo } from '../shared/protocol.js';
import { diskFileStems } from './disk-file-name.js';
import { findDisk } from './point-blocks.js';
import { restoreDisk } from './restore-disk.js';
import { withSignalCleanup } from './signal-cleanup.js';
import { targetError } from './target-file.js';

export const IMAGE_PLACEHOLDER = '{image}';
/** How much of a check's output (stdout and stderr, interleaved) the report keeps: the end. */
const OUTPUT_TAIL_CHARS = 4096;
/** How long the output pipes may stay open after the check's group was killed (a process that left it holds them). */
const PIPE_DRAIN_MS = 1000;
/** Secrets of this process that a check command has no business seeing. */
const WITHHELD_ENV = ['TIDEMARK_PASSPHRASE', 'TIDEMARK_PASSPHRASE_FILE', 'TIDEMARK_TOKEN'];

export interface DrillOptions {
  /** Shell command with `{image}` where the image path goes. */
  check: string;
  /** One disk by name; default every disk of the point. */
  disk?: string;
  /** Directory to make the scratch directory in; default the system temp directory. */
  scratch?: string;
  /** A check still running after this long is killed (with its children) and fails. */
  checkTimeoutMs: number;
}

export interface DrillDiskResult {
  name: string;
  passed: boolean;
  /** null when the check was ended by a signal (see `signal`). */
  exitCode: number | null;
  signal: string | null;
  /** The check ran longer than --check-timeout and was killed. */
  timedOut: boolean;
  /** The last OUTPUT_TAIL_CHARS characters of the check's output. */
  output: string;
}

export interface DrillResult {
  point: number;
  host: string;
  time: string;
  disks: DrillDiskResult[];
  passed: boolean;
}

export function checkCommandFor(check: string, image: string): string {
  if (!check.includes(IMAGE_PLACEHOLDER)) {
    throw new TidemarkError('E_USAGE', `--check must name the image as ${IMAGE_PLACEHOLDER}, e.g. --check "e2fsck -fn ${IMAGE_PLACEHOLDER}"`);
  }
  return check.replaceAll(IMAGE_PLACEHOLDER, shellQuote(image));
}

export function shellQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

export async function drillPoint(conn: ReceiverConnection, keys: VaultKeys, point: PointInfo, options: DrillOptions): Promise<DrillResult> {
  checkCommandFor(options.check, ''); // a bad --check fails before anything is restored
  const disks = options.disk === undefined ? point.disks : [findDisk(point, options.disk)];
  const stems = diskFileStems(disks.map((d) => d.name));
  const scratchParent = resolve(options.scratch ?? tmpdir());
  const scratch = await mkdtemp(join(scratchParent, 'tidemark-drill-')).catch((err: unknown) => {
    throw targetError(err, scratchParent, { option: options.scratch === undefined ? '--scratch (or TMPDIR)' : '--scratch' });
  });
  let running: RunningCheck | undefined;
  const removeScratch = () => rmSync(scratch, { recursive: true, force: true });
  try {
    return await withSignalCleanup(() => {
      running?.kill();
      removeScratch();
    }, async () => {
      const results: DrillDiskResult[] = [];
      for (const disk of disks) {
        const image = join(scratch, `${stems.get(disk.name)}.img`);
        await restoreDisk(conn, keys, point, disk.name, image);
        const check = runCheck(checkCommandFor(options.check, image), scratch, { TIDEMARK_DISK: disk.name, TIDEMARK_IMAGE: image }, options.checkTimeoutMs);
        running = check;
        const outcome = await check.done;
        running = undefined;
        results.push({ name: disk.name, passed: outcome.exitCode === 0 && !outcome.timedOut, ...outcome });
        await rm(image, { force: true }); // one image at a time in the scratch directory
      }
      return {
        point: point.id, host: point.host, time: new Date(point.timeMs).toISOString(),
        disks: results, passed: results.every((r) => r.passed),
      };
    });
  } finally {
    removeScratch();
  }
}

type CheckOutcome = Omit<DrillDiskResult, 'name' | 'passed'>;

interface RunningCheck {
  /** SIGKILL to the check's whole process group: the shell and what it started (fsck, mount, ...). */
  kill(): void;
  done: Promise<CheckOutcome>;
}

function runCheck(command: string, cwd: string, env: Record<string, string>, timeoutMs: number): RunningCheck {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
  for (const name of WITHHELD_ENV) delete childEnv[name];
  // Its own process group, so that a timeout or an interrupt ends every process of the check.
  const child: ChildProcess = spawn('/bin/sh', ['-c', command], { cwd, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const kill = () => {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  };
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    kill();
  }, timeoutMs);
  let output = '';
  const keep = (data: Buffer) => {
    output += data.toString('utf8');
    if (output.length > 2 * OUTPUT_TAIL_CHARS) output = output.slice(-OUTPUT_TAIL_CHARS);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  const done = new Promise<CheckOutcome>((resolvePromise, reject) => {
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new TidemarkError('E_INTERNAL', `cannot run the check: ${err.message}`, { cause: err }));
    });
    // Done when the check exits, not when its output closes: a process it left in the
    // background may hold stdout open. Its group is killed then: nothing outlives the drill.
    child.once('exit', (exitCode, signal) => {
      clearTimeout(timer);
      kill();
      // The output written until then is still to be read; a process that left the group may hold the pipes.
      const escaped = setTimeout(() => [child.stdout!, child.stderr!].forEach((pipe) => pipe.destroy()), PIPE_DRAIN_MS);
      child.once('close', () => {
        clearTimeout(escaped);
        if (timedOut) output += `\n[tidemark: check killed after ${Math.round(timeoutMs / 1000)} s (--check-timeout)]`;
        resolvePromise({ exitCode, signal, timedOut, output: output.slice(-OUTPUT_TAIL_CHARS) });
      });
    });
  });
  return { kill, done };
}
