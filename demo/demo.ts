// `npm run demo`: a receiver, an agent and a sample ext4 disk, end to end, on
// loopback, in a fresh temp directory. Prints every command it runs (secrets
// redacted) so they can be repeated by hand; cleans up on every path.
import { execFileSync, spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes } from '../shared/units.js';
import { addFileToExt4Image, sha256File, writeExt4Image } from '../test/fixtures.js';

const ROOT = resolve(fileURLToPath(import.meta.url), '../../..'); // dist/demo/demo.js → repo root
const MiB = 1024 * 1024;
const PASSPHRASE = 'demo passphrase: use a long random one for real data';
const HOST = 'demo-host';
type Tool = 'agent' | 'receiver' | 'restore';
/** A token passed as TIDEMARK_TOKEN (never argv); printed commands show only its kind. */
interface Token { kind: 'enrollment' | 'restore'; value: string }

/** Long values shown as shell variables in printed commands, e.g. $DEMO for the temp directory. */
const aliases: Array<[value: string, name: string]> = [];
let receiver: ChildProcess | undefined;
let current: ChildProcess | undefined; // the CLI being run, stopped too if the demo is interrupted
let root: string | undefined;
let servedOn: string | undefined; // HOST:PORT, for the "kept" hint

function alias(name: string, value: string): void {
  aliases.push([value, `$${name}`]);
  console.log(`  $ export ${name}=${quote(value)}`);
}

function quote(arg: string): string {
  return /^[\w@%+=:,./$-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

function show(tool: Tool, args: string[], token?: Token, background = false): void {
  const env = token ? `TIDEMARK_TOKEN=<${token.kind} token> ` : '';
  const text = args.map((a) => aliases.reduce((s, [value, name]) => s.split(value).join(name), quote(a))).join(' ');
  console.log(`  $ ${env}tidemark-${tool} ${text}${background ? ' &' : ''}`);
}

function spawnTool(tool: Tool, args: string[], token: Token | undefined, stdio: StdioOptions, logLevel = 'warn'): ChildProcess {
  return spawn(process.execPath, [join(ROOT, 'bin', `tidemark-${tool}.js`), ...args], {
    env: { ...process.env, TIDEMARK_PASSPHRASE: PASSPHRASE, TIDEMARK_LOG_LEVEL: logLevel, ...(token && { TIDEMARK_TOKEN: token.value }) },
    stdio,
  });
}

/**
 * Runs a CLI and returns its stdout; throws on a non-zero exit. With `echo`, stdout is also printed
 * (indented) and stderr is inherited, so warnings and the live progress line (on a TTY) show.
 */
async function run(tool: Tool, args: string[], opts: { token?: Token; echo?: boolean } = {}): Promise<string> {
  show(tool, args, opts.token);
  const child = (current = spawnTool(tool, args, opts.token, ['ignore', 'pipe', opts.echo ? 'inherit' : 'pipe']));
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | string>((done, fail) => child.once('error', fail).once('close', (c, sig) => done(c ?? sig!)));
  if (opts.echo) process.stdout.write(stdout.replace(/^(?=.)/gm, '    '));
  if (code !== 0) throw new Error(`tidemark-${tool} ${args[0]} exited ${code}${stderr ? `: ${stderr.trim()}` : ''}`);
  return stdout;
}

const runJson = async <T>(tool: Tool, args: string[], token?: Token): Promise<T> => JSON.parse(await run(tool, [...args, '--json'], { token })) as T;

function step(title: string): void {
  console.log(`\n==> ${title}`);
}

/** Starts `serve` on an ephemeral loopback port; resolves with the port from its "listening" log line. */
function serve(dataDir: string): Promise<number> {
  const args = ['serve', '--data', dataDir, '--listen', '127.0.0.1:0'];
  show('receiver', args, undefined, true);
  const child = (receiver = spawnTool('receiver', args, undefined, ['ignore', 'pipe', 'pipe'], 'info'));
  child.stdout!.resume();
  let log = '';
  return new Promise((done, fail) => {
    child.stderr!.on('data', (d: Buffer) => {
      log = (log + d.toString()).slice(-64 * 1024); // keep draining so the receiver never blocks on a full pipe
      const line = log.split('\n').find((l) => l.includes('"msg":"listening"'));
      if (line) done((JSON.parse(line) as { port: number }).port);
    });
    child.once('exit', (code) => fail(new Error(`receiver exited ${code} before listening: ${log.trim()}`)));
  });
}

function hasTool(name: string): boolean {
  return [name, `/usr/sbin/${name}`, `/sbin/${name}`].some((candidate) => {
    try {
      execFileSync(candidate, ['-V'], { stdio: 'ignore' });
      return true;
    } catch (err) {
      return (err as NodeJS.ErrnoException).code !== 'ENOENT'; // it exists even if -V exits non-zero
    }
  });
}

async function demo(dir: string): Promise<void> {
  const image = join(dir, 'disk.img');
  const data = join(dir, 'receiver');
  const state = join(dir, 'agent');
  const keyFile = join(dir, 'vault.key');
  console.log(`Working in a fresh temp directory; tidemark-X below is \`node ${ROOT}/bin/tidemark-X.js\`.`);
  alias('DEMO', dir);
  console.log(`  $ export TIDEMARK_PASSPHRASE=<secret>   # the vault key's passphrase; never passed on the command line`);
  console.log(`  $ export TIDEMARK_LOG_LEVEL=warn       # hide the JSON info logs (serve keeps info: it logs its port)`);

  step('1. Sample disk: a 256 MiB ext4 image, ~40% full of files (the rest stays zero)');
  await writeExt4Image(image, 256 * MiB, 42, 0.4);
  console.log(`  created ${image.replace(dir, '$DEMO')} (mkfs.ext4 -d with generated binaries, logs and archives)`);

  step('2. Receiver: create its data directory, serve on loopback, issue tokens');
  const { fingerprint } = await runJson<{ fingerprint: string }>('receiver', ['init', '--data', data]);
  console.log(`  TLS fingerprint (clients pin it):`);
  alias('FP', fingerprint);
  const port = await serve(data);
  servedOn = `127.0.0.1:${port}`;
  console.log(`  listening on ${servedOn}`);
  const url = `wss://${servedOn}`;
  alias('RECEIVER', url);
  const enrollToken: Token = { kind: 'enrollment', value: (await runJson<{ token: string }>('receiver', ['token', '--data', data])).token };
  const restoreToken: Token = { kind: 'restore', value: (await runJson<{ token: string }>('receiver', ['token', '--data', data, '--restore'])).token };
  console.log('  got a one-time enrollment token and a read-only restore token');

  step('3. Agent: enroll, look at the disk, initial full sync');
  const connect = ['--receiver', url, '--fingerprint', fingerprint, '--key-file', keyFile, '--host', HOST];
  await run('agent', ['enroll', '--state', state, ...connect], { token: enrollToken, echo: true });
  await run('agent', ['scan', image], { echo: true });
  await run('agent', ['run', '--once', '--state', state, '--disk', image], { echo: true });
  const sources = [await sha256File(image)];
  console.log(`  point 1 source SHA-256: ${sources[0]}`);

  step('4. Change the disk (add an 8 MiB file, overwrite an existing one), incremental sync');
  await addFileToExt4Image(image, 'projects/current/new-release.bin', 8 * MiB, 7);
  await addFileToExt4Image(image, 'logs/file-000.log', 512 * 1024, 8);
  console.log('  added /projects/current/new-release.bin (8 MiB), overwrote /logs/file-000.log (512 KiB) via debugfs');
  sources.push(await sha256File(image));
  console.log(`  point 2 source SHA-256: ${sources[1]}`);
  await run('agent', ['run', '--once', '--state', state, '--disk', image], { echo: true });

  step('5. Restore every point and compare with the source');
  const { points } = await runJson<{ points: PointJson[] }>('restore', ['points', ...connect], restoreToken);
  printPoints(points);
  if (points.length !== sources.length) throw new Error(`expected ${sources.length} points, the receiver lists ${points.length}`);
  let mismatches = 0;
  for (const [i, point] of points.entries()) {
    const to = join(dir, `restored-${point.id}.img`);
    await run('restore', ['disk', ...connect, '--disk', image, '--point', String(point.id), '--to', to], { token: restoreToken });
    const restored = await sha256File(to);
    if (restored === sources[i]) {
      console.log(`  point ${point.id}: restored image SHA-256 = source SHA-256 at that point ✓ (${restored.slice(0, 8)}…)`);
    } else {
      console.log(`  point ${point.id}: MISMATCH ✗ restored SHA-256 ${restored} != source ${sources[i]}`);
      mismatches++;
    }
  }
  if (mismatches > 0) throw new Error(`${mismatches} restored image(s) differ from their source`);

  step('6. Status as the receiver and the agent see it');
  await run('receiver', ['status', '--data', data], { echo: true });
  await run('agent', ['status', '--state', state], { echo: true });
}

interface PointJson {
  id: number;
  time: string;
  crashConsistent: boolean;
  disks: Array<{ name: string; sizeBytes: number; changedBytes: number }>;
}

function printPoints(points: PointJson[]): void {
  const rows = [['point', 'time', 'crash-consistent', 'changed'], ...points.map((p) => [
    String(p.id), p.time, p.crashConsistent ? 'yes' : 'NO', formatBytes(p.disks.reduce((sum, d) => sum + d.changedBytes, 0)),
  ])];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  for (const r of rows) console.log(`  ${r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ')}`.trimEnd());
}

async function stop(child: ChildProcess | undefined): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((done) => child.once('exit', done));
  process.kill(child.pid!, 'SIGTERM');
  await exited;
}

async function cleanup(): Promise<void> {
  await stop(current);
  await stop(receiver);
  if (!root) return;
  if (process.env.TIDEMARK_DEMO_KEEP === '1') {
    console.log(`\nKept the demo directory (TIDEMARK_DEMO_KEEP=1): ${root}`);
    if (servedOn) console.log(`The receiver was stopped; to use it again: tidemark-receiver serve --data ${root}/receiver --listen ${servedOn}`);
  } else rmSync(root, { recursive: true, force: true });
  root = undefined;
}

async function main(): Promise<number> {
  const missing = ['mkfs.ext4', 'debugfs'].filter((t) => !hasTool(t));
  if (missing.length > 0) {
    console.error(`demo: ${missing.join(' and ')} not found: install e2fsprogs (e.g. apt-get install e2fsprogs)`);
    return 1;
  }
  process.once('SIGINT', () => void cleanup().finally(() => process.exit(130)));
  root = mkdtempSync(join(tmpdir(), 'tidemark-demo-'));
  try {
    await demo(root);
    console.log('\nDemo complete: every recovery point restored bit-for-bit.');
    return 0;
  } catch (err) {
    console.error(`\ndemo failed: ${(err as Error).message}`);
    return 1;
  } finally {
    await cleanup();
  }
}

process.exitCode = await main();
