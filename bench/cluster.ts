// Real CLIs as child processes on loopback: one receiver for the whole bench
// (the test harness's Deployment), agents enrolled per scenario, each process
// watched for its peak RSS and CPU time.
import type { ChildProcess } from 'node:child_process';
import { Deployment, collect, spawnCli, lastEvent } from '../test/harness.js';
import { ProcessWatch } from './proc-watch.js';

export interface AgentRun {
  point: Record<string, any>;
  peakRssBytes: number;
  wallSeconds: number;
  /** CPU seconds (user + system, every thread) of the agent, and of the receiver meanwhile. */
  agentCpuSeconds: number;
  receiverCpuSeconds: number;
}

export interface RestoreRun {
  wallSeconds: number;
  peakRssBytes: number;
  restoreCpuSeconds: number;
  receiverCpuSeconds: number;
  /** The `disk --json` document (bytesWritten, bytesRead, blocksWritten, ...). */
  report: Record<string, number>;
}

export class BenchCluster {
  private receiverWatch: ProcessWatch | null = null;
  private agentPeak = 0;

  private constructor(readonly deployment: Deployment) {}

  static async start(): Promise<BenchCluster> {
    const deployment = await Deployment.start();
    const cluster = new BenchCluster(deployment);
    cluster.receiverWatch = new ProcessWatch(deployment.receiver.pid);
    return cluster;
  }

  get receiverPeakRssBytes(): number {
    this.receiverWatch?.sample();
    return this.receiverWatch?.peakRssBytes ?? 0;
  }

  private receiverCpuSeconds(): number {
    this.receiverWatch?.sample();
    return this.receiverWatch?.cpuSeconds ?? 0;
  }

  get agentPeakRssBytes(): number {
    return this.agentPeak;
  }

  enroll(host: string): Promise<string> {
    return this.deployment.enroll(host);
  }

  /** `tidemark-agent run --once` on the disks: the final point event, peak RSS, wall and CPU time. */
  async runOnce(host: string, disks: string[]): Promise<AgentRun> {
    const start = process.hrtime.bigint();
    const receiverCpuBefore = this.receiverCpuSeconds();
    const child = spawnCli('agent', ['run', '--once', '--json', '--state', this.deployment.stateDir(host), ...disks.flatMap((d) => ['--disk', d])]);
    const watch = ProcessWatch.watch(child);
    const result = await collect(child);
    const wallSeconds = Number(process.hrtime.bigint() - start) / 1e9;
    if (result.code !== 0) throw new Error(`agent run --once exited ${result.code}: ${result.stderr.trim().slice(-2000)}`);
    this.noteAgentPeak(watch.peakRssBytes);
    return {
      point: lastEvent(result.stdout, 'point'), peakRssBytes: watch.peakRssBytes, wallSeconds,
      agentCpuSeconds: watch.cpuSeconds, receiverCpuSeconds: this.receiverCpuSeconds() - receiverCpuBefore,
    };
  }

  /** `tidemark-restore disk` of the point to a file (`extra`: e.g. --failback): wall time, the restore process's peak RSS and CPU time, its --json report. */
  async restore(host: string, disk: string, pointId: number, to: string, extra: string[] = []): Promise<RestoreRun> {
    const start = process.hrtime.bigint();
    const receiverCpuBefore = this.receiverCpuSeconds();
    const child = spawnCli('restore', ['disk', ...this.deployment.restoreArgs(host), '--disk', disk, '--point', String(pointId), '--to', to, '--json', ...extra],
      { TIDEMARK_TOKEN: this.deployment.restoreToken });
    const watch = ProcessWatch.watch(child);
    const result = await collect(child);
    if (result.code !== 0) throw new Error(`restore disk exited ${result.code}: ${result.stderr.trim().slice(-2000)}`);
    return {
      wallSeconds: Number(process.hrtime.bigint() - start) / 1e9, peakRssBytes: watch.peakRssBytes,
      restoreCpuSeconds: watch.cpuSeconds, receiverCpuSeconds: this.receiverCpuSeconds() - receiverCpuBefore,
      report: JSON.parse(result.stdout) as Record<string, number>,
    };
  }

  /** A long-running agent (`run` without --once); the caller reads its stdout and stops it. */
  spawnAgent(host: string, args: string[]): { child: ChildProcess; watch: ProcessWatch } {
    const child = spawnCli('agent', ['run', '--json', '--state', this.deployment.stateDir(host), ...args]);
    const watch = ProcessWatch.watch(child);
    child.once('exit', () => this.noteAgentPeak(watch.peakRssBytes));
    return { child, watch };
  }

  noteAgentPeak(bytes: number): void {
    this.agentPeak = Math.max(this.agentPeak, bytes);
  }

  async close(): Promise<void> {
    this.receiverWatch?.stop();
    await this.deployment.close();
  }
}
