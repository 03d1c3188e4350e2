// A failed `tidemark-agent enroll` leaves the state directory and the key file as
// they were (real receiver and agent processes): the next attempt starts clean,
// not in a half-made state directory or with a key file of a vault nobody enrolled.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, runCli, runJson } from './harness.js';

const oneLine = (s: string) => {
  const lines = s.trim().split('\n');
  assert.equal(lines.length, 1, `expected a one-line error, got:\n${s}`);
  return lines[0]!;
};

describe('a failed enroll', () => {
  let d: Deployment;
  const enroll = (stateDir: string, host: string, token: string, keyFile: string, extra: { url?: string; fingerprint?: string } = {}) => {
    const args = d.enrollArgs(stateDir, host, keyFile, extra.url);
    if (extra.fingerprint) args[args.indexOf('--fingerprint') + 1] = extra.fingerprint;
    return runCli('agent', args, { TIDEMARK_TOKEN: token });
  };

  before(async () => {
    d = await Deployment.start();
    await d.enroll('web');
  });
  after(() => d?.close());

  it('leaves no state directory and no key file behind, and the next attempt enrolls', async () => {
    const parent = join(d.root, 'new-parent');
    const stateDir = join(parent, 'state');
    const keyFile = join(d.root, 'fresh.key');
    const cases: Array<[string, () => ReturnType<typeof runCli>, number, RegExp]> = [
      ['receiver unreachable', () => enroll(stateDir, 'fresh', 'tmenroll_never', keyFile, { url: 'wss://127.0.0.1:1' }), 4, /unreachable/],
      ['wrong fingerprint', () => enroll(stateDir, 'fresh', 'tmenroll_never', keyFile, { fingerprint: 'AB'.repeat(32) }), 7, /fingerprint .*not the pinned one/],
      ['token refused', () => enroll(stateDir, 'fresh', 'tmenroll_never', keyFile), 6, /enrollment token unknown or already used/],
    ];
    for (const [what, attempt, code, message] of cases) {
      const r = await attempt();
      assert.equal(r.code, code, `${what}: ${r.stderr}`);
      assert.match(oneLine(r.stderr), message, what);
      assert.ok(!existsSync(parent), `${what}: the state directory (and the parent it made) is gone`);
      assert.ok(!existsSync(keyFile), `${what}: the key file it created is gone`);
    }
    const ok = await enroll(stateDir, 'fresh', await d.receiver.token(), keyFile);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal((await runJson('agent', ['status', '--state', stateDir])).host, 'fresh');
  });

  it('into an existing directory, removes only what it created', async () => {
    const stateDir = join(d.root, 'prepared');
    mkdirSync(stateDir);
    writeFileSync(join(stateDir, 'README'), 'the operator\'s own file\n');
    const r = await enroll(stateDir, 'prepared', 'tmenroll_never', join(d.root, 'prepared.key'));
    assert.equal(r.code, 6, r.stderr);
    assert.deepEqual(readdirSync(stateDir), ['README']);

    // An enrolled directory is refused as before, and stays enrolled.
    const again = await enroll(d.stateDir('web'), 'web', await d.receiver.token(), d.keyFile);
    assert.equal(again.code, 10, again.stderr);
    assert.match(oneLine(again.stderr), /already enrolled as host web/);
    assert.equal((await runJson('agent', ['status', '--state', d.stateDir('web')])).host, 'web');
  });

  it('accepted by the receiver but not saved here: says the host is enrolled and how to enroll it again', async () => {
    const stateDir = join(d.root, 'unsaveable');
    mkdirSync(join(stateDir, 'credential', 'in-the-way'), { recursive: true }); // the credential file cannot take this name
    const r = await enroll(stateDir, 'unsaveable', await d.receiver.token(), d.keyFile);
    assert.notEqual(r.code, 0);
    assert.match(oneLine(r.stderr), /the receiver enrolled host unsaveable, but its credential could not be saved in .*unsaveable .*; fix that, then enroll again with a token from tidemark-receiver token --host unsaveable$/);
    rmSync(join(stateDir, 'credential'), { recursive: true });
    const { token } = await runJson('receiver', ['token', '--data', d.receiver.dataDir, '--host', 'unsaveable']);
    const ok = await enroll(stateDir, 'unsaveable', token, d.keyFile);
    assert.equal(ok.code, 0, `what the message says works: ${ok.stderr}`);
  });

  it('a re-enrollment refused for another key file leaves no new key file: the vault\'s own then works', async () => {
    await runJson('receiver', ['revoke', '--data', d.receiver.dataDir, '--host', 'web']);
    const { token } = await runJson('receiver', ['token', '--data', d.receiver.dataDir, '--host', 'web']);
    const stateDir = join(d.root, 'web-rebuilt');
    const wrongKey = join(d.root, 'not-the-vault.key');
    const refused = await enroll(stateDir, 'web', token, wrongKey);
    assert.equal(refused.code, 6, refused.stderr);
    assert.match(oneLine(refused.stderr), /host "web" was enrolled with another key file .*re-enroll it with that key file/);
    assert.ok(!existsSync(wrongKey), 'the key file this attempt created is gone');
    assert.ok(!existsSync(stateDir));
    const ok = await enroll(stateDir, 'web', token, d.keyFile);
    assert.equal(ok.code, 0, ok.stderr);
  });
});
