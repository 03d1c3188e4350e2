// Peak memory of a child process: the kernel keeps the high-water mark of its
// resident set (VmHWM in /proc/PID/status); we read it until the process
// exits, and the last value read is its peak (it only grows).
import { readFileSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';

const POLL_MS = 100;

export function readPeakRssBytes(pid: number): number | null {
  try {
    const kib = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    return kib === undefined ? null : Number(kib) * 1024;
  } catch {
    return null; // already gone
  }
}

export class PeakRss {
  private peak = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly pid: number) {
    this.timer = setInterval(() => this.sample(), POLL_MS);
    this.timer.unref();
    this.sample();
  }

  static watch(child: ChildProcess): PeakRss {
    const watch = new PeakRss(child.pid!);
    child.once('exit', () => watch.stop());
    return watch;
  }

  sample(): void {
    const now = readPeakRssBytes(this.pid);
    if (now !== null && now > this.peak) this.peak = now;
  }

  get bytes(): number {
    return this.peak;
  }

  stop(): void {
    clearInterval(this.timer);
  }
}
