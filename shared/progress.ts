// Progress of long work: bytes done of total, rate over a sliding window, ETA.
import { formatBytes, formatDuration } from './units.js';

export interface ProgressSnapshot {
  phase: string;
  bytesDone: number;
  bytesTotal: number;
  bytesPerSecond: number;
  etaSeconds: number | null;
  percent: number;
}

export class Progress {
  private readonly samples: Array<{ atMs: number; bytes: number }> = [];
  bytesDone = 0;

  constructor(
    readonly phase: string,
    readonly bytesTotal: number,
    private readonly windowMs = 5000,
  ) {
    this.samples.push({ atMs: Date.now(), bytes: 0 });
  }

  add(bytes: number): void {
    this.bytesDone += bytes;
    const now = Date.now();
    this.samples.push({ atMs: now, bytes: this.bytesDone });
    while (this.samples.length > 2 && now - this.samples[1]!.atMs > this.windowMs) this.samples.shift();
  }

  snapshot(): ProgressSnapshot {
    const first = this.samples[0]!;
    const elapsedS = (Date.now() - first.atMs) / 1000;
    const bytesPerSecond = elapsedS > 0 ? (this.bytesDone - first.bytes) / elapsedS : 0;
    const remaining = Math.max(0, this.bytesTotal - this.bytesDone);
    return {
      phase: this.phase,
      bytesDone: this.bytesDone,
      bytesTotal: this.bytesTotal,
      bytesPerSecond: Math.round(bytesPerSecond),
      etaSeconds: bytesPerSecond > 0 ? Math.round(remaining / bytesPerSecond) : null,
      percent: this.bytesTotal > 0 ? Math.min(100, (100 * this.bytesDone) / this.bytesTotal) : 100,
    };
  }

  static format(s: ProgressSnapshot): string {
    return `${s.phase}: ${formatBytes(s.bytesDone)} / ${formatBytes(s.bytesTotal)} (${s.percent.toFixed(1)}%) ` +
      `${formatBytes(s.bytesPerSecond)}/s ETA ${s.etaSeconds === null ? '?' : formatDuration(s.etaSeconds)}`;
  }
}

/**
 * Reports progress at most every `intervalMs`: a rewritten line on a TTY
 * (stderr), or JSON lines `{"event":"progress",...}` on stdout with --json.
 */
export class ProgressReporter {
  private lastMs = 0;

  constructor(
    private readonly json: boolean,
    private readonly intervalMs = 500,
  ) {}

  report(progress: Progress, force = false): void {
    const now = Date.now();
    if (!force && now - this.lastMs < this.intervalMs) return;
    this.lastMs = now;
    const snapshot = progress.snapshot();
    if (this.json) process.stdout.write(JSON.stringify({ event: 'progress', ...snapshot }) + '\n');
    else if (process.stderr.isTTY) process.stderr.write(`\r\x1b[K${Progress.format(snapshot)}`);
  }

  /** Ends the progress line, if one was written. */
  done(): void {
    if (!this.json && process.stderr.isTTY && this.lastMs > 0) process.stderr.write('\n');
  }
}
