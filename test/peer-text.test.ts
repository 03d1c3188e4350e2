// Text one party chose, printed on another's terminal: an agent's disk names and
// status reason in `tidemark-receiver status` and `tidemark-restore points`, a
// receiver's error message in every CLI's error line. A compromised agent (or a
// hostile receiver) must not be able to send escape sequences to the operator's
// terminal (recolour, retitle, clear it) or add lines that pass for the tool's own,
// such as a healthy status of another host. Control characters are shown escaped
// (shared/cli-util.ts printable); JSON output escapes them anyway.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Deployment, runCli } from './harness.js';
import { RawClient } from './raw-client.js';
import { vaultKeys } from './point-check.js';
import { TamperingRelay } from './tampering-relay.js';

/** ESC, BEL, a bidi override, the C1 CSI: none may reach a terminal from a peer. */
const CONTROL = /[\u001b\u0007\u202e\u009b]/;
const FORGED_HOST_LINE = 'host db1: Replicating, 99 points, last point 99';

describe('text from agents and receivers on the operator\'s terminal', () => {
  let d: Deployment;
  const diskName = `/dev/vdb\u001b]0;owned\u0007\u001b[2J\n${FORGED_HOST_LINE}`;
  const reason = `all fine\u001b[1A\u001b[2K\u202e\u009b31m\n${FORGED_HOST_LINE}`;

  before(async () => {
    d = await Deployment.start();
    await d.enroll('web1');
    // web1's agent, compromised: it names a disk and reports a state as it likes, and commits a point of that disk.
    const keys = vaultKeys(d.keyFile);
    const agent = await RawClient.open(d.receiver.url, d.receiver.fingerprint, readFileSync(join(d.stateDir('web1'), 'credential'), 'utf8').trim());
    try {
      assert.equal((await agent.request('hello', { vaultId: keys.vaultId, vaultProof: keys.vaultProof })).t, 'ok');
      const disk = await agent.request('disk.register', { name: diskName, sizeBytes: 1 << 20, sectorBytes: 512, blockBytes: 65536 });
      assert.equal(disk.t, 'ok', disk.message);
      const point = await agent.request('point.begin', { resume: null });
      const committed = await agent.request('point.commit', { pointId: point.pointId, timeMs: Date.now(), crashConsistent: true, disks: [{ diskId: disk.diskId, changedBytes: 0 }] });
      assert.equal(committed.t, 'ok', committed.message);
      const reported = await agent.request('status.report', { state: 'Replicating', reason, tracker: 'scan', backlogBytes: 0, bytesPerSecond: 0 });
      assert.equal(reported.t, 'ok', reported.message);
    } finally {
      agent.close();
    }
  });
  after(() => d?.close());

  it('tidemark-receiver status shows an agent\'s disk names and reason escaped, one line each', async () => {
    const r = await runCli('receiver', ['status', '--data', d.receiver.dataDir]);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout, CONTROL, r.stdout);
    assert.deepEqual(r.stdout.split('\n').filter((l) => l.startsWith('host ')).map((l) => l.split(':')[0]), ['host web1'], r.stdout);
    assert.match(r.stdout, /\(all fine\\x1b\[1A\\x1b\[2K\\u202e\\x9b31m\\x0ahost db1/, 'the reason is shown, escaped');
    assert.ok(r.stdout.includes('disk /dev/vdb\\x1b]0;owned\\x07\\x1b[2J\\x0ahost db1'), r.stdout);
    const json = JSON.parse((await runCli('receiver', ['status', '--data', d.receiver.dataDir, '--json'])).stdout);
    assert.equal(json.hosts[0].reason, reason, 'JSON keeps the text as sent');
  });

  it('tidemark-restore points shows the disk name escaped, one line per point', async () => {
    const r = await runCli('restore', ['points', ...d.restoreArgs('web1')], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout, CONTROL, r.stdout);
    assert.equal(r.stdout.trim().split('\n').length, 1, r.stdout);
    assert.ok(r.stdout.includes('/dev/vdb\\x1b]0;owned'), r.stdout);
  });

  it('a receiver\'s error message is one escaped line on stderr', async () => {
    const relay = await TamperingRelay.start(d.receiver);
    try {
      relay.tamper = (type, reply) => type === 'hello'
        ? { t: 'error', rid: reply.rid, code: 'E_FORBIDDEN', message: `no\u001b[2J\u001b]0;owned\u0007\nrestored 10 GiB, every chunk verified`, retryable: false }
        : reply;
      const args = ['--receiver', relay.url, '--fingerprint', d.receiver.fingerprint, '--key-file', d.keyFile, '--host', 'web1'];
      const r = await runCli('restore', ['points', ...args], { TIDEMARK_TOKEN: d.restoreToken });
      assert.equal(r.code, 6, r.stderr);
      assert.doesNotMatch(r.stderr, CONTROL, r.stderr);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.ok(r.stderr.includes('no\\x1b[2J\\x1b]0;owned\\x07\\x0arestored 10 GiB'), r.stderr);
    } finally {
      await relay.close();
    }
  });
});
