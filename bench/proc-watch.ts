// Peak memory and CPU time of a process, read from /proc until it exits: the
// kernel keeps the high-water mark of its resident set (VmHWM in status) and
// the user and system time of all its threads (stat). Both only grow, so the
// last values read stand; CPU time misses at most the last poll interval.
import { readFileSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';

const POLL_MS = 50;
/** USER_HZ: the unit of /proc/PID/stat times, 100 on every Linux architecture Node runs on. */
const CLOCK_TICKS_PER_SECOND = 100;

export function readPeakRssBytes(pid: number): number | null {
  try {
    const kib = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    return kib === undefined ? null : Number(kib) * 1024;
  } catch {
    return null; // already gone
  }
}

/** User plus system CPU seconds of every thread of the process so far; null once it is gone. */
export function readCpuSeconds(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // field 3 (state) onwards: comm may hold spaces
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS_PER_SECOND; // fields 14 and 15: utime, stime
  } catch {
    return null;
  }
}

/** This machine's CPU time so far, all CPUs, in ticks (/proc/stat). */
export interface HostCpuTicks {
  /** Time the hypervisor ran something else while this VM's CPUs wanted to run (0 on bare metal). */
  steal: number;
  total: number;
}

export function readHostCpuTicks(): HostCpuTicks {
  // cpu  user nice system idle iowait irq softirq steal ...: guest time is already counted in user.
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1, 9).map(Number);
  return { steal: fields[7] ?? 0, total: fields.reduce((sum, t) => sum + t, 0) };
}

/** The share of the CPU time since `since` that the hypervisor took (steal): figures measured under a high one run slow. */
export function stealShareSince(since: HostCpuTicks): number {
  const now = readHostCpuTicks();
  const total = now.total - since.total;
  return total > 0 ? (now.steal - since.steal) / total : 0;
}

export class ProcessWatch {
  private peak = 0;
  private cpu = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly pid: number) {
    this.timer = setInterval(() => this.sample(), POLL_MS);
    this.timer.unref();
    this.sample();
  }

  static watch(child: ChildProcess): ProcessWatch {
    const watch = new ProcessWatch(child.pid!);
    child.once('exit', () => watch.stop());
    return watch;
  }

  sample(): void {
    const rss = readPeakRssBytes(this.pid);
    if (rss !== null && rss > this.peak) this.peak = rss;
    const cpu = readCpuSeconds(this.pid);
    if (cpu !== null && cpu > this.cpu) this.cpu = cpu;
  }

  get peakRssBytes(): number {
    return this.peak;
  }

  get cpuSeconds(): number {
    return this.cpu;
  }

  stop(): void {
    clearInterval(this.timer);
  }
}
