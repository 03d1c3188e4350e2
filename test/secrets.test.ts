// Secrets on the client side (SPEC §3.1, §6.3, §10): a client that meets a
// certificate other than the pinned one sends nothing — not the token, not the
// credential — and exits 7; tokens, credentials and the passphrase never show
// in argv (/proc/PID/cmdline, ps), in any log, or in the agent's state.db.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { X509Certificate, randomBytes } from 'node:crypto';
import { connect as tlsConnect, createServer, type Server } from 'node:tls';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { generate } from 'selfsigned';
import { TOKEN_ARGV_WARNING } from '../shared/cli-util.js';
import { Deployment, collect, runJson, spawnCli, tempDir, type CliResult, type Tool } from './harness.js';
import { writeMixedImage } from './fixtures.js';

const MiB = 1024 * 1024;

/**
 * A TLS server with its own self-signed certificate that records every application byte a
 * client sends. TLS 1.2: the server finishes its side of the handshake before the client
 * sees the certificate checked, so whatever a client wrote next would be received here.
 */
class ImpostorServer {
  connections = 0;
  handshakes = 0;
  readonly received: Buffer[] = [];

  private constructor(private readonly server: Server, readonly fingerprint: string) {}

  static async start(): Promise<ImpostorServer> {
    const pems = await generate([{ name: 'commonName', value: 'tidemark-receiver' }], { keyType: 'ec', curve: 'P-256', algorithm: 'sha256' });
    let impostor!: ImpostorServer;
    const server = createServer({ key: pems.private, cert: pems.cert, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' }, (socket) => {
      impostor.handshakes++;
      socket.on('data', (d: Buffer) => impostor.received.push(d));
      socket.on('error', () => {});
    });
    server.on('connection', () => impostor.connections++);
    server.on('tlsClientError', () => {});
    impostor = new ImpostorServer(server, new X509Certificate(pems.cert).fingerprint256.replace(/:/g, ''));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return impostor;
  }

  get url(): string {
    return `wss://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  get bytesReceived(): number {
    return this.received.reduce((n, b) => n + b.length, 0);
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

describe('TLS pinning before credentials', () => {
  let d: Deployment;
  let impostor: ImpostorServer;
  let state: string;
  let disk: string;

  before(async () => {
    d = await Deployment.start();
    state = await d.enroll('pinned');
    disk = join(d.root, 'pinned.img');
    await writeMixedImage(disk, 2 * MiB, 5);
    impostor = await ImpostorServer.start();
  });
  after(async () => {
    await impostor?.close();
    await d?.close();
  });

  const expectRefused = async (what: string, run: () => Promise<CliResult>) => {
    const handshakesBefore = impostor.handshakes;
    const r = await run();
    assert.equal(r.code, 7, `${what}: ${r.stderr}`);
    assert.match(r.stderr, new RegExp(`presented certificate fingerprint ${impostor.fingerprint}, not the pinned one.*nothing was sent`));
    assert.ok(impostor.handshakes > handshakesBefore, `${what} completed a TLS handshake with the impostor`);
    assert.equal(impostor.bytesReceived, 0, `${what} sent application bytes to the impostor`);
  };

  it('the impostor would see what a client that does not pin sends', async () => {
    const socket = tlsConnect({ host: '127.0.0.1', port: Number(new URL(impostor.url).port), rejectUnauthorized: false });
    await new Promise<void>((resolve) => socket.once('secureConnect', () => socket.end('GET /v1/session', () => resolve())));
    for (let i = 0; i < 100 && impostor.bytesReceived === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(impostor.bytesReceived > 0);
    impostor.received.length = 0;
  });

  it('enroll sends no enrollment token to a server with another certificate', async () => {
    const token = await d.receiver.token();
    await expectRefused('enroll', () => collect(spawnCli('agent', d.enrollArgs(join(d.root, 'state-impostor'), 'impostor-victim', d.keyFile, impostor.url), { TIDEMARK_TOKEN: token })));
  });

  it('run --once sends no host credential', async () => {
    const db = new Database(join(state, 'state.db'));
    try {
      const enrollment = JSON.parse(db.prepare(`SELECT value FROM config WHERE key = 'enrollment'`).pluck().get() as string);
      db.prepare(`UPDATE config SET value = ? WHERE key = 'enrollment'`).run(JSON.stringify({ ...enrollment, receiverUrl: impostor.url }));
    } finally {
      db.close();
    }
    await expectRefused('run --once', () => collect(spawnCli('agent', ['run', '--once', '--state', state, '--disk', disk])));
  });

  it('restore sends no restore token', async () => {
    await expectRefused('restore points', () => collect(spawnCli('restore', ['points', '--receiver', impostor.url, '--fingerprint', d.receiver.fingerprint,
      '--key-file', d.keyFile, '--host', 'pinned'], { TIDEMARK_TOKEN: d.restoreToken })));
    await expectRefused('restore disk', () => collect(spawnCli('restore', ['disk', '--receiver', impostor.url, '--fingerprint', d.receiver.fingerprint,
      '--key-file', d.keyFile, '--host', 'pinned', '--disk', disk, '--point', '1', '--to', join(d.root, 'never.img')], { TIDEMARK_TOKEN: d.restoreToken })));
  });
});

/** Runs a CLI, sampling /proc/PID/cmdline while it runs (what `ps` shows every local user). */
async function runWatched(tool: Tool, args: string[], env: Record<string, string | undefined>): Promise<CliResult & { cmdlines: string[] }> {
  const child: ChildProcess = spawnCli(tool, args, env);
  const done = collect(child);
  const cmdlines: string[] = [];
  let exited = false;
  child.once('exit', () => (exited = true));
  while (!exited) {
    try {
      cmdlines.push(readFileSync(`/proc/${child.pid}/cmdline`, 'utf8').replace(/\0/g, ' '));
    } catch {
      /* exited between the check and the read */
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  const result = await done;
  assert.ok(cmdlines.some((c) => c.includes(`tidemark-${tool}`)), `sampled the command line of tidemark-${tool} while it ran`);
  return { ...result, cmdlines };
}

describe('secrets are not in argv, logs or ps', () => {
  const root = tempDir();
  const dataDir = join(root, 'receiver');
  const passphrase = `passphrase-${randomBytes(12).toString('hex')}`;
  const passphraseFile = join(root, 'passphrase');
  const keyFile = join(root, 'vault.key');
  const secrets = new Map<string, string>([['passphrase', passphrase]]);
  const outputs: Array<{ what: string; text: string }> = [];
  const cmdlines: Array<{ what: string; text: string }> = [];
  let receiver: ChildProcess;
  let receiverLog = '';
  let url = '';
  let fingerprint = '';
  // The passphrase comes from a file; TIDEMARK_PASSPHRASE (which the harness sets) is removed.
  const withPassphraseFile = (env: Record<string, string | undefined> = {}) => ({ TIDEMARK_PASSPHRASE: undefined, TIDEMARK_PASSPHRASE_FILE: passphraseFile, TIDEMARK_LOG_LEVEL: 'debug', ...env });

  const watched = async (what: string, tool: Tool, args: string[], env: Record<string, string | undefined>, expectCode = 0) => {
    const r = await runWatched(tool, args, withPassphraseFile(env));
    assert.equal(r.code, expectCode, `${what}: ${r.stderr}`);
    outputs.push({ what: `${what} stdout`, text: r.stdout }, { what: `${what} stderr`, text: r.stderr });
    for (const c of r.cmdlines) cmdlines.push({ what, text: c });
    return r;
  };
  const token = async (restore = false) => (await runJson<{ token: string }>('receiver', ['token', '--data', dataDir, ...(restore ? ['--restore'] : [])])).token;
  const secretFile = (name: string, value: string) => {
    const path = join(root, name);
    writeFileSync(path, `${value}\n`, { mode: 0o600 });
    return path;
  };
  const stateDir = (host: string) => join(root, `agent-${host}`);
  const enrollArgs = (host: string) => ['enroll', '--state', stateDir(host), '--receiver', url, '--fingerprint', fingerprint, '--key-file', keyFile, '--host', host];
  const restoreArgs = (host: string) => ['--receiver', url, '--fingerprint', fingerprint, '--key-file', keyFile, '--host', host];

  before(async () => {
    writeFileSync(passphraseFile, `${passphrase}\n`, { mode: 0o600 });
    ({ fingerprint } = await runJson<{ fingerprint: string }>('receiver', ['init', '--data', dataDir]));
    receiver = spawnCli('receiver', ['serve', '--data', dataDir, '--listen', '127.0.0.1:0'], { TIDEMARK_LOG_LEVEL: 'debug' });
    const port = await new Promise<number>((resolve, reject) => {
      receiver.stderr!.on('data', (d: Buffer) => {
        receiverLog += d.toString();
        const line = receiverLog.split('\n').find((l) => l.includes('"msg":"listening"'));
        if (line) resolve((JSON.parse(line) as { port: number }).port);
      });
      receiver.once('exit', (code) => reject(new Error(`receiver exited ${code}: ${receiverLog}`)));
    });
    url = `wss://127.0.0.1:${port}`;
  });
  after(async () => {
    if (receiver && receiver.exitCode === null) {
      const exited = new Promise((r) => receiver.once('exit', r));
      receiver.kill('SIGTERM');
      await exited;
    }
    rmSync(root, { recursive: true, force: true });
  });

  it('enroll with TIDEMARK_TOKEN and with --token-file', async () => {
    const envToken = await token();
    secrets.set('enrollment token (env)', envToken);
    await watched('enroll (TIDEMARK_TOKEN)', 'agent', enrollArgs('web1'), { TIDEMARK_TOKEN: envToken });
    const fileToken = await token();
    secrets.set('enrollment token (file)', fileToken);
    const r = await watched('enroll (--token-file)', 'agent', [...enrollArgs('web2'), '--token-file', secretFile('enroll-token', fileToken), '--json'], { TIDEMARK_TOKEN: undefined });
    assert.equal(JSON.parse(r.stdout).host, 'web2');
    for (const host of ['web1', 'web2']) {
      const credentialFile = join(stateDir(host), 'credential');
      assert.equal(statSync(credentialFile).mode & 0o777, 0o600);
      secrets.set(`credential of ${host}`, readFileSync(credentialFile, 'utf8').trim());
    }
  });

  it('sync and restore with --token-file and TIDEMARK_TOKEN', async () => {
    const disk = join(root, 'web1.img');
    await writeMixedImage(disk, 2 * MiB, 9);
    const run = await watched('run --once', 'agent', ['run', '--once', '--json', '--state', stateDir('web1'), '--disk', disk], {});
    const pointId = JSON.parse(run.stdout.trim().split('\n').at(-1)!).pointId as number;
    const restoreToken = await token(true);
    secrets.set('restore token', restoreToken);
    const tokenFile = secretFile('restore-token', restoreToken);
    await watched('restore points (--token-file)', 'restore', ['points', ...restoreArgs('web1'), '--token-file', tokenFile], { TIDEMARK_TOKEN: undefined });
    await watched('restore disk (--token-file)', 'restore', ['disk', ...restoreArgs('web1'), '--disk', disk, '--point', String(pointId), '--to', join(root, 'out.img'), '--token-file', tokenFile], { TIDEMARK_TOKEN: undefined });
    // A host credential as the restore credential, from the environment.
    await watched('restore points (credential in TIDEMARK_TOKEN)', 'restore', ['points', ...restoreArgs('web1')], { TIDEMARK_TOKEN: secrets.get('credential of web1') });
    // A refused, unknown token is not logged either.
    const bogus = `tmrestore_${randomBytes(24).toString('base64url')}`;
    secrets.set('refused token', bogus);
    await watched('restore points (unknown token)', 'restore', ['points', ...restoreArgs('web1')], { TIDEMARK_TOKEN: bogus }, 6);
  });

  it('--token still works but warns that ps shows it; --token with --token-file is a usage error', async () => {
    const argvToken = await token(true);
    const r = await runWatched('restore', ['points', ...restoreArgs('web1'), '--token', argvToken], withPassphraseFile({ TIDEMARK_TOKEN: undefined }));
    assert.equal(r.code, 0, r.stderr);
    assert.ok(r.stderr.includes(`tidemark-restore: warning: ${TOKEN_ARGV_WARNING}`), r.stderr);
    assert.ok(r.cmdlines.some((c) => c.includes(argvToken)), 'argv is indeed visible in /proc/PID/cmdline');
    const both = await runWatched('restore', ['points', ...restoreArgs('web1'), '--token', argvToken, '--token-file', join(root, 'restore-token')], withPassphraseFile());
    assert.equal(both.code, 2);
    assert.match(both.stderr, /either --token or --token-file/);
  });

  it('no secret appears in any command line, log or output, nor in state.db', async () => {
    // Stop the receiver so every log line is flushed.
    const exited = new Promise((r) => receiver.once('exit', r));
    receiver.kill('SIGTERM');
    await exited;
    assert.match(receiverLog, /host enrolled/, 'the receiver logged at debug level');
    assert.ok(cmdlines.length >= 7);
    const haystacks = [...cmdlines.map((c) => ({ what: `command line of ${c.what}`, text: c.text })), ...outputs, { what: 'receiver log', text: receiverLog }];
    for (const [name, secret] of secrets) {
      for (const h of haystacks) assert.ok(!h.text.includes(secret), `${name} appears in the ${h.what}`);
    }
    // The credential lives only in the 0600 credential file, not in the state database.
    for (const host of ['web1', 'web2']) {
      const dir = stateDir(host);
      const credential = secrets.get(`credential of ${host}`)!;
      const files = readdirSync(dir).filter((f) => f.startsWith('state.db'));
      assert.ok(files.includes('state.db'));
      for (const f of files) {
        const content = readFileSync(join(dir, f));
        for (const [name, secret] of secrets) assert.equal(content.indexOf(secret), -1, `${name} is in ${host}'s ${f}`);
        assert.equal(content.indexOf(credential), -1);
      }
    }
    // Nor in the receiver's data directory (it stores SHA-256 of each secret).
    const walk = (dir: string): string[] => readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : [join(dir, e.name)]));
    for (const file of walk(dataDir)) {
      const content = readFileSync(file);
      for (const [name, secret] of secrets) assert.equal(content.indexOf(secret), -1, `${name} is in ${file}`);
    }
    assert.ok(existsSync(join(dataDir, 'catalog.db')));
  });
});
