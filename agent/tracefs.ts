// Kernel write tracking through tracefs, without a kernel module (SPEC §8.2).
//
// One tracefs instance per agent (instances/tidemark-<id>) records
// block_bio_queue (a write or discard was issued) and block_rq_complete /
// block_bio_complete (it reached the device), filtered in the kernel to the
// protected devices. A partition is tracked on its whole disk's device number
// and sector range: the block layer reports remapped, absolute sectors.
// The agent reads trace_pipe without blocking; a line written to trace_marker
// tells it when every event issued before the marker has been read.
import { closeSync, constants, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, rmdirSync, statSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { TidemarkError } from '../shared/errors.js';

export const TRACEFS_ROOT = '/sys/kernel/tracing';
const EVENTS = ['block/block_bio_queue', 'block/block_rq_complete', 'block/block_bio_complete'];
const BUFFER_SIZE_KB = 8192;
const READ_BUFFER_BYTES = 1 << 20;
const EVENT_LINE = /\s(\d+\.\d+): (block_bio_queue|block_rq_complete|block_bio_complete): (\d+),(\d+) (\S+) (?:\([^)]*\) )?(\d+) \+ (\d+)/;
const MARKER_LINE = /tracing_mark_write: (tidemark-\S+)/;

/** What the tracker watches of one protected disk. */
export interface TraceTarget {
  /** Kernel dev_t of the whole disk: major << 20 | minor. */
  dev: number;
  /** Partition start and length in 512-byte sectors (whole disk: 0 and its size). */
  startSector: number;
  sectors: number;
  blockBytes: number;
}

export type WriteKind = 'queue' | 'complete';
/** `atSeconds`: CLOCK_MONOTONIC time of the event (the instance's trace_clock is "mono"), as process.hrtime. */
export type WriteListener = (target: number, firstBlock: number, lastBlock: number, kind: WriteKind, atSeconds: number) => void;

/** CLOCK_MONOTONIC now, in seconds: comparable with event times. */
export function monotonicSeconds(): number {
  return Number(process.hrtime.bigint()) / 1e9;
}

/** Why tracefs cannot be used here, or null when it can (mounting it if needed). */
export function tracefsUnavailableReason(): string | null {
  if (process.getuid?.() !== 0) return 'tracefs needs root';
  if (!existsSync(join(TRACEFS_ROOT, 'instances'))) {
    try {
      execFileSync('mount', ['-t', 'tracefs', 'nodev', TRACEFS_ROOT], { stdio: 'ignore' });
    } catch {
      return `tracefs is not mounted at ${TRACEFS_ROOT} and mounting it failed`;
    }
  }
  if (!existsSync(join(TRACEFS_ROOT, 'events', 'block', 'block_bio_queue'))) return 'the kernel has no block tracepoints';
  return null;
}

export class TraceInstance {
  private fd: number;
  private partial = '';
  private readonly buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  private markerCount = 0;

  private constructor(
    readonly dir: string,
    private readonly targets: TraceTarget[],
    /** True when this process created the instance (nothing was tracked before). */
    readonly fresh: boolean,
  ) {
    this.fd = openSync(join(dir, 'trace_pipe'), constants.O_RDONLY | constants.O_NONBLOCK);
  }

  /**
   * Opens the agent's instance, reusing one that survived an agent restart
   * when its filter is the one wanted (its buffered events are then still to be read).
   */
  static open(name: string, targets: TraceTarget[]): TraceInstance {
    const dir = join(TRACEFS_ROOT, 'instances', name);
    const filter = filterFor(targets);
    if (existsSync(dir)) {
      const current = readFileSync(join(dir, 'events', EVENTS[0]!, 'filter'), 'utf8').trim();
      const enabled = readFileSync(join(dir, 'events', EVENTS[0]!, 'enable'), 'utf8').trim() === '1';
      if (current === filter && enabled) return new TraceInstance(dir, targets, false);
      rmdirSync(dir);
    }
    mkdirSync(dir);
    try {
      writeFileSync(join(dir, 'buffer_size_kb'), String(BUFFER_SIZE_KB));
      writeFileSync(join(dir, 'trace_clock'), 'mono');
      for (const event of EVENTS) {
        const eventDir = join(dir, 'events', event);
        if (!existsSync(eventDir)) continue;
        writeFileSync(join(eventDir, 'filter'), filter);
        writeFileSync(join(eventDir, 'enable'), '1');
      }
      writeFileSync(join(dir, 'tracing_on'), '1');
    } catch (err) {
      rmdirSync(dir);
      throw new TidemarkError('E_DISK', `cannot set up tracefs instance ${dir}: ${(err as Error).message}`);
    }
    return new TraceInstance(dir, targets, true);
  }

  /** Events lost by the kernel (ring buffer overrun) since the instance was made. */
  lostEvents(): number {
    let lost = 0;
    for (const cpu of readdirSync(join(this.dir, 'per_cpu'))) {
      const stats = readFileSync(join(this.dir, 'per_cpu', cpu, 'stats'), 'utf8');
      for (const m of stats.matchAll(/^(?:overrun|dropped events): (\d+)/gm)) lost += Number(m[1]);
    }
    return lost;
  }

  /** Writes a marker; `drainUntil` returns once it has been read back. */
  mark(): string {
    const label = `tidemark-${process.pid}-${++this.markerCount}`;
    writeFileSync(join(this.dir, 'trace_marker'), label);
    return label;
  }

  /** Reads every event available now; returns true when `marker` was among them. */
  drain(listener: WriteListener, marker?: string): boolean {
    let seen = false;
    for (;;) {
      let n: number;
      try {
        n = readSync(this.fd, this.buffer, 0, this.buffer.length, null);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return seen;
        throw err;
      }
      if (n === 0) return seen;
      const lines = (this.partial + this.buffer.toString('latin1', 0, n)).split('\n');
      this.partial = lines.pop()!;
      for (const line of lines) if (this.onLine(line, listener) === marker && marker !== undefined) seen = true;
    }
  }

  /** Drains until the marker comes back: every event issued before it is then applied. */
  async drainUntil(marker: string, listener: WriteListener, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.drain(listener, marker)) {
      if (Date.now() > deadline) throw new TidemarkError('E_STATE', `tracefs marker ${marker} did not come back within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** Stops reading; `remove` also deletes the instance (tracking ends). */
  close(remove: boolean): void {
    closeSync(this.fd);
    if (!remove) return;
    try {
      writeFileSync(join(this.dir, 'tracing_on'), '0');
      rmdirSync(this.dir);
    } catch {
      /* already gone */
    }
  }

  /** Instance identity, to tell after a restart that it is the one we made. */
  inode(): number {
    return statSync(this.dir).ino;
  }

  private onLine(line: string, listener: WriteListener): string | undefined {
    const event = EVENT_LINE.exec(line);
    if (!event) return MARKER_LINE.exec(line)?.[1];
    const atSeconds = Number(event[1]);
    const dev = (Number(event[3]) << 20) | Number(event[4]);
    const sector = Number(event[6]);
    const count = Number(event[7]);
    if (count === 0 || !/[WD]/.test(event[5]!)) return undefined;
    const kind: WriteKind = event[2] === 'block_bio_queue' ? 'queue' : 'complete';
    this.targets.forEach((t, i) => {
      const from = Math.max(sector, t.startSector);
      const to = Math.min(sector + count, t.startSector + t.sectors);
      if (t.dev !== dev || from >= to) return;
      listener(i, Math.floor(((from - t.startSector) * 512) / t.blockBytes), Math.floor(((to - t.startSector) * 512 - 1) / t.blockBytes), kind, atSeconds);
    });
    return undefined;
  }
}

function filterFor(targets: TraceTarget[]): string {
  const devs = [...new Set(targets.map((t) => t.dev))].map((d) => `dev == ${d}`).join(' || ');
  return `(${devs}) && (rwbs ~ "*W*" || rwbs ~ "*D*")`;
}
