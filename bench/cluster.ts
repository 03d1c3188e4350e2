// Real CLIs as child processes on loopback: one receiver for the whole bench
// (the test harness's Deployment), agents enrolled per scenario, each agent
// run watched for its peak RSS.
import type { ChildProcess } from 'node:child_process';
import { Deployment, collect, spawnCli, lastEvent } from '../test/harness.js';
import { PeakRss } from './proc-watch.js';

export interface AgentRun {
  point: Record<string, any>;
  peakRssBytes: number;
  wallSeconds: number;
}

export class BenchCluster {
  private receiverPeak: PeakRss | null = null;
  private agentPeak = 0;

  private constructor(readonly deployment: Deployment) {}

  static async start(): Promise<BenchCluster> {
    const deployment = await Deployment.start();
    const cluster = new BenchCluster(deployment);
    cluster.receiverPeak = new PeakRss(deployment.receiver.pid);
    return cluster;
  }

  get receiverPeakRssBytes(): number {
    this.receiverPeak?.sample();
    return this.receiverPeak?.bytes ?? 0;
  }

  get agentPeakRssBytes(): number {
    return this.agentPeak;
  }

  enroll(host: string): Promise<string> {
    return this.deployment.enroll(host);
  }

  /** `tidemark-agent run --once` on the disks; the final point event, peak RSS and wall time. */
  async runOnce(host: string, disks: string[]): Promise<AgentRun> {
    const start = process.hrtime.bigint();
    const child = spawnCli('agent', ['run', '--once', '--json', '--state', this.deployment.stateDir(host), ...disks.flatMap((d) => ['--disk', d])]);
    const peak = PeakRss.watch(child);
    const result = await collect(child);
    const wallSeconds = Number(process.hrtime.bigint() - start) / 1e9;
    if (result.code !== 0) throw new Error(`agent run --once exited ${result.code}: ${result.stderr.trim().slice(-2000)}`);
    this.noteAgentPeak(peak.bytes);
    return { point: lastEvent(result.stdout, 'point'), peakRssBytes: peak.bytes, wallSeconds };
  }

  /** `tidemark-restore disk` of the point to a file; wall time and the restore process's peak RSS. */
  async restore(host: string, disk: string, pointId: number, to: string): Promise<{ wallSeconds: number; peakRssBytes: number }> {
    const start = process.hrtime.bigint();
    const child = spawnCli('restore', ['disk', ...this.deployment.restoreArgs(host), '--disk', disk, '--point', String(pointId), '--to', to, '--json'],
      { TIDEMARK_TOKEN: this.deployment.restoreToken });
    const peak = PeakRss.watch(child);
    const result = await collect(child);
    if (result.code !== 0) throw new Error(`restore disk exited ${result.code}: ${result.stderr.trim().slice(-2000)}`);
    return { wallSeconds: Number(process.hrtime.bigint() - start) / 1e9, peakRssBytes: peak.bytes };
  }

  /** A long-running agent (`run` without --once); the caller reads its stdout and stops it. */
  spawnAgent(host: string, args: string[]): { child: ChildProcess; peak: PeakRss } {
    const child = spawnCli('agent', ['run', '--json', '--state', this.deployment.stateDir(host), ...args]);
    const peak = PeakRss.watch(child);
    child.once('exit', () => this.noteAgentPeak(peak.bytes));
    return { child, peak };
  }

  noteAgentPeak(bytes: number): void {
    this.agentPeak = Math.max(this.agentPeak, bytes);
  }

  async close(): Promise<void> {
    this.receiverPeak?.stop();
    await this.deployment.close();
  }
}
