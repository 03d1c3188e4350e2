// Bad input of every kind gets a clear one-line error and a distinct exit
// code; the receiver stays up and committed data stays intact.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import WebSocket from 'ws';
import { connectPinned } from '../shared/connection.js';
import { encodeFrame, MAX_FRAME_BYTES, PROTOCOL_HEADER, SESSION_PATH } from '../shared/protocol.js';
import { Packr } from 'msgpackr';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { openKeyFile } from '../shared/keyfile.js';
import { Deployment, PASSPHRASE, runCli, runJson, spawnCli } from './harness.js';
import { sha256File, writeMixedImage } from './fixtures.js';

const MiB = 1024 * 1024;

function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  assert.equal(lines.length, 1, `expected a one-line error, got:\n${stderr}`);
  return lines[0]!;
}

/** A raw WebSocket with a valid host credential, to send what no honest client sends. */
async function rawSession(d: Deployment, credential: string): Promise<WebSocket> {
  const url = new URL(d.receiver.url);
  const socket = await connectPinned(url, d.receiver.fingerprint);
  const ws = new WebSocket(new URL(SESSION_PATH, url), {
    createConnection: () => socket,
    headers: { authorization: `Bearer ${credential}`, [PROTOCOL_HEADER]: '1' },
    perMessageDeflate: false,
    maxPayload: MAX_FRAME_BYTES,
  });
  await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
  return ws;
}

/** Sends one frame and waits for the receiver to close; returns the close code and any error frame. */
async function sendAndAwaitClose(ws: WebSocket, frame: Buffer | string): Promise<{ code: number; error?: any }> {
  let error: any;
  ws.on('message', (data: Buffer) => (error = new Packr({ mapsAsObjects: true }).unpack(data)));
  const closed = new Promise<number>((resolve) => ws.once('close', (code) => resolve(code)));
  ws.on('error', () => {});
  ws.send(frame, { binary: typeof frame !== 'string' });
  return { code: await closed, error };
}

describe('bad input', () => {
  let d: Deployment;
  let disk: string;
  let state: string;
  let committedSha: string;
  let pointId: number;

  before(async () => {
    d = await Deployment.start();
    state = await d.enroll('delta');
    disk = join(d.root, 'delta.img');
    await writeMixedImage(disk, 8 * MiB, 11);
    pointId = (await d.syncOnce('delta', [disk])).pointId;
    committedSha = await sha256File(disk);
  });
  after(() => d?.close());

  it('wrong passphrase: exit 3 and a line naming the fix', async () => {
    const r = await runCli('agent', ['run', '--once', '--state', state, '--disk', disk], { TIDEMARK_PASSPHRASE: 'not the passphrase' });
    assert.equal(r.code, 3);
    assert.match(oneLine(r.stderr), /wrong passphrase .*TIDEMARK_PASSPHRASE/);
    const restore = await runCli('restore', ['points', ...d.restoreArgs('delta')], { TIDEMARK_TOKEN: d.restoreToken, TIDEMARK_PASSPHRASE: 'nope nope nope' });
    assert.equal(restore.code, 3);
  });

  it('missing passphrase: usage error', async () => {
    const r = await runCli('agent', ['run', '--once', '--state', state, '--disk', disk], { TIDEMARK_PASSPHRASE: '' });
    assert.equal(r.code, 2);
    assert.match(oneLine(r.stderr), /no passphrase/);
  });

  it('a missing or unknown flag of a subcommand: exit 2 and one line, in every CLI', async () => {
    const cases: Array<[Parameters<typeof runCli>[0], string[], RegExp]> = [
      ['receiver', ['token'], /^tidemark-receiver: required option '--data <dir>' not specified \(see --help\)$/],
      ['receiver', ['status', '--data', d.receiver.dataDir, '--verbose'], /^tidemark-receiver: unknown option '--verbose'/],
      ['agent', ['run', '--state', state, '--no-such-flag'], /^tidemark-agent: unknown option '--no-such-flag'/],
      ['restore', ['disk', '--to', 'x.img'], /^tidemark-restore: required option '--receiver <url>' not specified/],
    ];
    for (const [tool, args, message] of cases) {
      const r = await runCli(tool, args);
      assert.equal(r.code, 2, `${tool} ${args.join(' ')}: ${r.stderr}`);
      assert.match(oneLine(r.stderr), message);
    }
  });

  it('a settings file with a wrong key or value: exit 2, one line naming the key', async () => {
    const config = join(d.root, 'agent-config.json');
    for (const [settings, message] of [
      [{ state, disks: [disk], intervall: '1h' }, /invalid --config .*: Unrecognized key.*intervall.*; see deploy/],
      [{ state, disks: [disk], tracker: 'kernel' }, /invalid --config .*: tracker: \S/],
    ] as const) {
      writeFileSync(config, JSON.stringify(settings));
      const r = await runCli('agent', ['run', '--once', '--config', config]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(oneLine(r.stderr), message);
    }
    const receiverConfig = join(d.receiver.dataDir, 'config.json');
    writeFileSync(receiverConfig, JSON.stringify({ retention: { keepHourly: 'many' } }));
    try {
      const r = await runCli('receiver', ['status', '--data', d.receiver.dataDir]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(oneLine(r.stderr), /config\.json: (retention\.)?keepHourly: .*number.*; expected/i);
    } finally {
      rmSync(receiverConfig);
    }
  });

  it('serve on an address in use: exit 10, one line naming --listen, also when tried again', async () => {
    const port = new URL(d.receiver.url).port;
    const data = join(d.root, 'second-receiver');
    await runJson('receiver', ['init', '--data', data]);
    const serve = () => runCli('receiver', ['serve', '--data', data, '--listen', `127.0.0.1:${port}`]);
    for (const r of [await serve(), await serve()]) {
      assert.equal(r.code, 10, r.stderr);
      assert.match(oneLine(r.stderr), new RegExp(`--listen 127\\.0\\.0\\.1:${port}: the address is in use`));
    }
  });

  it('a disk named twice: exit 2 before anything is read', async () => {
    const link = join(d.root, 'delta-link.img');
    symlinkSync(disk, link);
    for (const [second, message] of [[disk, /--disk .* is given twice/], [link, /are the same disk/]] as const) {
      const r = await runCli('agent', ['run', '--once', '--state', state, '--disk', disk, '--disk', second]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(oneLine(r.stderr), message);
    }
  });

  it('a reader that closes stdout early: exit 141 and no stack trace', async () => {
    const child = spawnCli('receiver', ['status', '--data', d.receiver.dataDir]);
    child.stdout!.destroy(); // as `| head -0` does: every write gets EPIPE
    let stderr = '';
    child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    const code = await new Promise((resolve) => child.once('close', resolve));
    assert.equal(code, 141, stderr);
    assert.equal(stderr, '');
  });

  it('wrong fingerprint: exit 7 before any credential is sent', async () => {
    const wrong = 'AB:'.repeat(31) + 'AB';
    const r = await runCli('restore', ['points', '--receiver', d.receiver.url, '--fingerprint', wrong, '--key-file', d.keyFile, '--host', 'delta'], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(r.code, 7);
    assert.match(oneLine(r.stderr), /fingerprint .*not the pinned one/);
  });

  it('receiver unreachable: exit 4', async () => {
    const r = await runCli('restore', ['points', '--receiver', 'wss://127.0.0.1:1', '--fingerprint', d.receiver.fingerprint, '--key-file', d.keyFile], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(r.code, 4);
    assert.match(oneLine(r.stderr), /unreachable/);
  });

  it('unknown and reused enrollment tokens: exit 6', async () => {
    const enroll = (host: string, token: string) => runCli('agent', d.enrollArgs(join(d.root, `state-${host}`), host), { TIDEMARK_TOKEN: token });
    const unknown = await enroll('eps', 'tmenroll_thisTokenWasNeverIssued');
    assert.equal(unknown.code, 6);
    assert.match(oneLine(unknown.stderr), /enrollment token unknown or already used/);
    const token = await d.receiver.token();
    assert.equal((await enroll('zeta', token)).code, 0);
    const reused = await enroll('eta', token);
    assert.equal(reused.code, 6);
    assert.match(oneLine(reused.stderr), /enrollment token unknown or already used/);
  });

  it('a host this vault does not have: exit 9 and a line naming how to list hosts; one with no points yet lists none', async () => {
    const typo = await runCli('restore', ['points', ...d.restoreArgs('deltaa')], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(typo.code, 9, typo.stderr);
    assert.match(oneLine(typo.stderr), /no host named "deltaa" in this key file's vault .*tidemark-restore points without --host lists the hosts/);
    assert.equal(typo.stdout, '');
    const restore = await runCli('restore', ['disk', ...d.restoreArgs('deltaa'), '--disk', disk, '--point', String(pointId), '--to', join(d.root, 'typo.img')], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(restore.code, 9, restore.stderr);
    assert.match(oneLine(restore.stderr), /no host named "deltaa"/);

    await d.enroll('quiet');
    assert.deepEqual(await d.points('quiet'), [], 'an enrolled host without points: exit 0, no points');
    // A host of another vault is not this key file's to see: unknown, as a typo is.
    await d.enroll('elsewhere', join(d.root, 'other-vault.key'));
    const other = await runCli('restore', ['points', ...d.restoreArgs('elsewhere')], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(other.code, 9, other.stderr);
  });

  it('an unknown credential is refused on the upgrade', async () => {
    const r = await runCli('restore', ['points', ...d.restoreArgs('delta')], { TIDEMARK_TOKEN: 'tmrestore_forged' });
    assert.equal(r.code, 6);
    assert.match(oneLine(r.stderr), /credential not recognized/);
  });

  it('a restore token cannot write', async () => {
    const ws = await rawSession(d, d.restoreToken);
    const replies: any[] = [];
    ws.on('message', (data: Buffer) => replies.push(new Packr({ mapsAsObjects: true }).unpack(data)));
    // A restore token with the vault's key file: hello succeeds, writing does not.
    const keys = VaultKeys.fromMaster(openKeyFile(d.keyFile, PASSPHRASE));
    ws.send(encodeFrame({ t: 'hello', rid: 1, vaultId: keys.vaultId, vaultProof: keys.vaultProof }));
    ws.send(encodeFrame({ t: 'point.begin', rid: 2, resume: null }));
    await new Promise((r) => setTimeout(r, 300));
    ws.close();
    assert.equal(replies.find((m) => m.rid === 1)?.t, 'ok');
    const begin = replies.find((m) => m.rid === 2);
    assert.equal(begin?.t, 'error');
    assert.equal(begin?.code, 'E_FORBIDDEN');
  });

  for (const [name, frame, expectedClose] of [
    ['garbage bytes', Buffer.from('this is not msgpack at all \x00\xff\xc1'), 1002],
    ['a truncated frame', encodeFrame({ t: 'chunk.put', rid: 7, id: Buffer.alloc(32, 1), data: Buffer.alloc(4096, 2) }).subarray(0, 100), 1002],
    ['an unknown message type', encodeFrame({ t: 'point.delete', rid: 8, pointId: 1 }), 1002],
    ['a malformed message', encodeFrame({ t: 'chunks.query', rid: 9, ids: ['not binary'] }), 1002],
    ['a text frame', 'hello', 1003],
    ['an oversized frame', Buffer.alloc(MAX_FRAME_BYTES + 1), 1009],
  ] as const) {
    it(`${name} closes the session with ${expectedClose}; the receiver stays up`, async () => {
      const credential = readFileSync(join(state, 'credential'), 'utf8').trim();
      const ws = await rawSession(d, credential);
      const { code, error } = await sendAndAwaitClose(ws, frame as Buffer | string);
      assert.equal(code, expectedClose);
      if (expectedClose === 1002) assert.equal(error?.code, 'E_PROTOCOL');
    });
  }

  it('after all that, the receiver serves and committed data is intact', async () => {
    const points = await d.points('delta');
    assert.deepEqual(points.map((p) => p.id), [pointId]);
    const out = join(d.root, 'intact.img');
    await d.restore('delta', disk, pointId, out);
    assert.equal(await sha256File(out), committedSha);
  });
});
