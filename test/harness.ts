// Test harness: real receiver and agent processes on loopback, in temp directories.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = resolve(fileURLToPath(import.meta.url), '../../..');
export const PASSPHRASE = 'correct horse battery staple';

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export type Tool = 'agent' | 'receiver' | 'restore';

/** `root`: a checkout whose CLIs to run; another release's for version-skew tests (test/release.ts). */
export function launcherPath(tool: Tool, root = REPO_ROOT): string {
  return join(root, 'bin', `tidemark-${tool}.js`);
}

/** The node flags a launcher's shebang (`#!/usr/bin/env -S node FLAGS`) gives the process. */
export function launcherNodeFlags(tool: Tool, root = REPO_ROOT): string[] {
  const shebang = readFileSync(launcherPath(tool, root), 'utf8').split('\n', 1)[0]!;
  const words = shebang.replace(/^#!\S+\s+/, '').split(/\s+/).filter(Boolean);
  return words.slice(words.indexOf('node') + 1);
}

/** Runs a CLI with this test's node and the flags its launcher's shebang gives node, as installed. */
export function spawnCli(tool: Tool, args: string[], env: Record<string, string | undefined> = {}, root = REPO_ROOT): ChildProcess {
  return spawn(process.execPath, [...launcherNodeFlags(tool, root), launcherPath(tool, root), ...args], {
    env: { ...process.env, TIDEMARK_PASSPHRASE: PASSPHRASE, TIDEMARK_LOG_LEVEL: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

export function runCli(tool: Tool, args: string[], env: Record<string, string | undefined> = {}, root = REPO_ROOT): Promise<CliResult> {
  const child = spawnCli(tool, args, env, root);
  return collect(child);
}

export function collect(child: ChildProcess): Promise<CliResult> {
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })));
}

/** As collect, but a command still running after `guardMs` has hung: it is killed (the result's signal is SIGKILL). */
export async function collectGuarded(child: ChildProcess, guardMs = 60_000): Promise<CliResult> {
  const guard = setTimeout(() => child.kill('SIGKILL'), guardMs);
  try {
    return await collect(child);
  } finally {
    clearTimeout(guard);
  }
}

/** Runs a CLI and parses its stdout as one JSON document; fails loudly otherwise. */
export async function runJson<T = any>(tool: Tool, args: string[], env: Record<string, string | undefined> = {}, root = REPO_ROOT): Promise<T> {
  const result = await runCli(tool, [...args, '--json'], env, root);
  if (result.code !== 0) throw new Error(`tidemark-${tool} ${args[0]} exited ${result.code}: ${result.stderr.trim()}`);
  return JSON.parse(result.stdout) as T;
}

export function tempDir(prefix = 'tidemark-test-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/**
 * Attaches `image` to a free loop device (`-P`: scan its partitions) and returns the device.
 * Read-write for sure: this kernel keeps a loop device read-only after `losetup -r` by an
 * earlier user, across its detach and the next attach.
 */
export function attachLoop(image: string, { partitions = false } = {}): string {
  const device = execFileSync('losetup', ['-f', '--show', ...(partitions ? ['-P'] : []), image], { encoding: 'utf8' }).trim();
  execFileSync('blockdev', ['--setrw', device]);
  return device;
}

export class ReceiverProcess {
  /** stderr (JSON log lines) of every serve process this object started, in order. */
  private readonly logs: Array<() => string> = [];

  private constructor(
    readonly dataDir: string,
    readonly fingerprint: string,
    private child: ChildProcess,
    public port: number,
    /** The checkout whose receiver this is. */
    public root: string,
  ) {}

  get url(): string {
    return `wss://127.0.0.1:${this.port}`;
  }

  static async init(dataDir: string, root = REPO_ROOT): Promise<ReceiverProcess> {
    const { fingerprint } = await runJson<{ fingerprint: string }>('receiver', ['init', '--data', dataDir], {}, root);
    const { child, port, log } = await ReceiverProcess.serve(dataDir, 0, root);
    const receiver = new ReceiverProcess(dataDir, fingerprint, child, port, root);
    receiver.logs.push(log);
    return receiver;
  }

  private static serve(dataDir: string, port: number, root: string): Promise<{ child: ChildProcess; port: number; log: () => string }> {
    const child = spawnCli('receiver', ['serve', '--data', dataDir, '--listen', `127.0.0.1:${port}`], { TIDEMARK_LOG_LEVEL: 'info' }, root);
    return new Promise((resolve, reject) => {
      let buffered = '';
      let listening = false;
      child.stderr!.on('data', (d: Buffer) => {
        buffered += d.toString();
        if (listening) return;
        const line = buffered.split('\n').find((l) => l.includes('"msg":"listening"'));
        if (!line) return;
        listening = true;
        resolve({ child, port: (JSON.parse(line) as { port: number }).port, log: () => buffered });
      });
      child.once('exit', (code) => reject(new Error(`receiver exited ${code} before listening: ${buffered}`)));
    });
  }

  /** Restarts on the same port (agents keep their address); `SIGKILL` for a crash; `root`: another release's receiver (an upgrade). */
  async restart(signal: NodeJS.Signals = 'SIGTERM', root = this.root): Promise<void> {
    await this.stop(signal);
    this.root = root;
    const { child, log } = await ReceiverProcess.serve(this.dataDir, this.port, this.root);
    this.child = child;
    this.logs.push(log);
  }

  /** The receiver's log (stderr JSON lines) across restarts. */
  get log(): string {
    return this.logs.map((l) => l()).join('');
  }

  get pid(): number {
    return this.child.pid!;
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill(signal);
    await exited;
  }

  async token(restore = false): Promise<string> {
    const { token } = await runJson<{ token: string }>('receiver', ['token', '--data', this.dataDir, ...(restore ? ['--restore'] : [])], {}, this.root);
    return token;
  }

  status(): Promise<any> {
    return runJson('receiver', ['status', '--data', this.dataDir], {}, this.root);
  }
}

/** A receiver, one enrolled agent and a restore token, in one temp directory. */
export class Deployment {
  readonly root = tempDir();
  readonly keyFile = join(this.root, 'vault.key');
  receiver!: ReceiverProcess;
  restoreToken!: string;

  /** `receiverRoot`: the checkout whose receiver to run (test/release.ts); the agent and restore CLIs are this one's unless a call says otherwise. */
  static async start(receiverRoot = REPO_ROOT): Promise<Deployment> {
    const d = new Deployment();
    d.receiver = await ReceiverProcess.init(join(d.root, 'receiver'), receiverRoot);
    d.restoreToken = await d.receiver.token(true);
    return d;
  }

  stateDir(host: string): string {
    return join(this.root, `agent-${host}`);
  }

  /** `tidemark-agent enroll` arguments for this deployment; `url`: another server to offer them to. */
  enrollArgs(stateDir: string, host: string, keyFile = this.keyFile, url = this.receiver.url): string[] {
    return ['enroll', '--state', stateDir, '--receiver', url, '--fingerprint', this.receiver.fingerprint, '--key-file', keyFile, '--host', host];
  }

  async enroll(host: string, keyFile = this.keyFile, agentRoot = REPO_ROOT): Promise<string> {
    const token = await this.receiver.token();
    const result = await runCli('agent', this.enrollArgs(this.stateDir(host), host, keyFile), { TIDEMARK_TOKEN: token }, agentRoot);
    if (result.code !== 0) throw new Error(`enroll failed (${result.code}): ${result.stderr}`);
    return this.stateDir(host);
  }

  /** `tidemark-agent run --once`; returns the final result line. */
  async syncOnce(host: string, disks: string[], extra: string[] = [], agentRoot = REPO_ROOT): Promise<any> {
    const result = await runCli('agent', ['run', '--once', '--json', '--state', this.stateDir(host), ...disks.flatMap((d) => ['--disk', d]), ...extra], {}, agentRoot);
    if (result.code !== 0) throw new Error(`run --once failed (${result.code}): ${result.stderr}`);
    return lastEvent(result.stdout, 'point');
  }

  restoreArgs(host: string): string[] {
    return ['--receiver', this.receiver.url, '--fingerprint', this.receiver.fingerprint, '--key-file', this.keyFile, '--host', host];
  }

  async points(host: string): Promise<any[]> {
    return (await runJson<{ points: any[] }>('restore', ['points', ...this.restoreArgs(host)], { TIDEMARK_TOKEN: this.restoreToken })).points;
  }

  async restore(host: string, disk: string, pointId: number, to: string, restoreRoot = REPO_ROOT): Promise<any> {
    return runJson('restore', ['disk', ...this.restoreArgs(host), '--disk', disk, '--point', String(pointId), '--to', to], { TIDEMARK_TOKEN: this.restoreToken }, restoreRoot);
  }

  async close(): Promise<void> {
    await this.receiver?.stop();
    rmSync(this.root, { recursive: true, force: true });
  }
}

export function lastEvent(stdout: string, event: string): any {
  const events = stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { event: string });
  const found = events.filter((e) => e.event === event).at(-1);
  if (!found) throw new Error(`no "${event}" event in output: ${stdout.slice(-500)}`);
  return found;
}
