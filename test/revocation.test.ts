// Revoking credentials and tokens, and re-enrolling a host under its own name
// (SPEC §3.2, §10): real receiver, agent and restore processes. A revoked secret
// is refused at the upgrade at once, and an open session using it is closed at
// the receiver's next heartbeat (15 s); a re-enrolled host keeps its points.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ReceiverConnection } from '../shared/connection.js';
import { SESSION_PATH } from '../shared/protocol.js';
import { Deployment, runCli, runJson } from './harness.js';
import { vaultKeys } from './point-check.js';

const BLOCK = 64 * 1024;
const oneLine = (s: string) => s.replace(/\s+/g, ' ');

describe('revocation and re-enrollment', () => {
  let d: Deployment;
  const receiverCli = (args: string[]) => runCli('receiver', [...args, '--data', d.receiver.dataDir]);
  const receiverJson = <T = any>(args: string[]) => runJson<T>('receiver', [...args, '--data', d.receiver.dataDir]);
  const enroll = (stateDir: string, host: string, token: string) => runCli('agent', d.enrollArgs(stateDir, host), { TIDEMARK_TOKEN: token });
  const tokenId = (token: string) => createHash('sha256').update(token).digest('hex').slice(0, 16);

  before(async () => {
    d = await Deployment.start();
    await d.enroll('web'); // also records the vault, which restore sessions need
  });
  after(async () => {
    await d?.close();
  });

  it('a revoked host is refused; a token from `token --host` enrolls it again under its name, and its points carry on', { timeout: 120_000 }, async () => {
    const image = join(d.root, 'web.img');
    const before = Buffer.concat([randomBytes(6 * BLOCK), Buffer.alloc(2 * BLOCK)]);
    writeFileSync(image, before);
    const first = await d.syncOnce('web', [image]);

    const revoked = await receiverJson(['revoke', '--host', 'web']);
    assert.equal(revoked.revoked, 'host');
    assert.equal(revoked.host, 'web');
    const web = () => receiverJson(['status']).then((s) => s.hosts.find((h: any) => h.name === 'web'));
    assert.equal((await web()).credentialRevokedAt, revoked.revokedAt);
    assert.match((await receiverCli(['status'])).stdout, /host web: .*credential revoked .*token --host web to enroll it again/);
    assert.equal(revoked.alreadyRevoked, false);

    // Again: nothing to do, and it says so, with the time of the revocation that did it (kept as it was).
    const revokedAgain = await receiverCli(['revoke', '--host', 'web']);
    assert.equal(revokedAgain.code, 0, revokedAgain.stderr);
    assert.equal(oneLine(revokedAgain.stdout).trim(), `host web's credential was already revoked at ${revoked.revokedAt}; nothing changed (token --host web enrolls it again)`);
    assert.deepEqual(await receiverJson(['revoke', '--host', 'web']), { ...revoked, alreadyRevoked: true });
    assert.equal((await web()).credentialRevokedAt, revoked.revokedAt);

    const refused = await runCli('agent', ['run', '--once', '--state', d.stateDir('web'), '--disk', image]);
    assert.equal(refused.code, 6, refused.stderr);
    assert.match(oneLine(refused.stderr), /credential not recognized by this receiver \(revoked.*token --host NAME/);

    const { token, host } = await receiverJson(['token', '--host', 'web']);
    assert.equal(host, 'web');
    const listed = () => receiverJson<{ tokens: any[] }>(['token', '--list']).then((l) => l.tokens.find((t) => t.id === tokenId(token)));
    assert.deepEqual(await listed().then((t) => [t.kind, t.usedAt, t.host]), ['enroll', null, 'web']);

    // The token names its host: another name is refused and the token is left unused.
    const otherName = await enroll(join(d.root, 'state-other'), 'other', token);
    assert.equal(otherName.code, 10, otherName.stderr);
    assert.match(oneLine(otherName.stderr), /this token re-enrolls host "web"; pass --host web/);
    assert.equal((await listed()).usedAt, null);

    const newState = join(d.root, 'state-web-rebuilt');
    const again = await enroll(newState, 'web', token);
    assert.equal(again.code, 0, again.stderr);
    assert.equal((await web()).credentialRevokedAt, null);
    assert.notEqual((await listed()).usedAt, null);

    // The rebuilt host syncs as "web": the receiver knows its disk, so the fresh state compares by hash.
    const after = Buffer.from(before);
    randomBytes(BLOCK).copy(after, 2 * BLOCK);
    writeFileSync(image, after);
    const result = await runCli('agent', ['run', '--once', '--json', '--state', newState, '--disk', image]);
    assert.equal(result.code, 0, result.stderr);

    const points = await d.points('web');
    assert.equal(points.length, 2);
    assert.equal(points[0].id, first.pointId);
    for (const [point, content] of [[points[0], before], [points[1], after]] as const) {
      const to = join(d.root, `restored-${point.id}.img`);
      await d.restore('web', image, point.id, to);
      assert.ok(readFileSync(to).equals(content), `point ${point.id} restores to the disk as it was synced`);
    }

    // The old credential stays revoked.
    const old = await runCli('agent', ['run', '--once', '--state', d.stateDir('web'), '--disk', image]);
    assert.equal(old.code, 6, old.stderr);
  });

  it('a revoked restore token is refused, and its open session is closed at the next heartbeat', { timeout: 60_000 }, async () => {
    const { token, id } = await receiverJson(['token', '--restore']);
    assert.equal(id, tokenId(token), 'token --json gives the id that revoke --token takes');
    const keys = vaultKeys(d.keyFile);
    const conn = await ReceiverConnection.open({ url: d.receiver.url, fingerprint: d.receiver.fingerprint, path: SESSION_PATH, authorization: `Bearer ${token}` });
    try {
      await conn.hello({ vaultId: keys.vaultId, vaultProof: keys.vaultProof });
      await conn.request('points.list', { host: null, afterId: null });

      const first = await receiverJson(['revoke', '--token', tokenId(token)]);
      assert.equal(first.revoked, 'token');
      assert.equal(first.token.kind, 'restore');
      assert.equal(first.alreadyRevoked, false);
      // Again: not "no token with id" (as if mistyped, exit 9) but when it was revoked, exit 0.
      const again = await receiverCli(['revoke', '--token', tokenId(token)]);
      assert.equal(again.code, 0, again.stderr);
      assert.equal(oneLine(again.stdout).trim(), `restore token ${tokenId(token)} was already revoked at ${first.revokedAt}; nothing changed`);
      assert.deepEqual(await receiverJson(['revoke', '--token', tokenId(token)]),
        { revoked: 'token', token: { id: tokenId(token), kind: 'restore' }, revokedAt: first.revokedAt, alreadyRevoked: true });
      const ids = (await receiverJson<{ tokens: any[] }>(['token', '--list'])).tokens.map((t) => t.id);
      assert.ok(!ids.includes(tokenId(token)), 'the revoked token is no longer listed');
      assert.ok(ids.includes(tokenId(d.restoreToken)), 'the other restore token is untouched');

      const refused = await runCli('restore', ['points', ...d.restoreArgs('web')], { TIDEMARK_TOKEN: token });
      assert.equal(refused.code, 6, refused.stderr);
      const untouched = await runCli('restore', ['points', ...d.restoreArgs('web'), '--json'], { TIDEMARK_TOKEN: d.restoreToken });
      assert.equal(untouched.code, 0, untouched.stderr);

      const deadline = Date.now() + 20_000;
      while (conn.isOpen && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
      assert.ok(!conn.isOpen, 'the receiver closed the session within a heartbeat of the revocation');
      // Not "unreachable" (exit 4, retryable): a script must see that retrying cannot help.
      await assert.rejects(conn.request('points.list', { host: null, afterId: null }), { code: 'E_AUTH', message: /4401: credential revoked/ });
    } finally {
      conn.close();
    }
  });

  it('a token made with --expires works until then, and is refused after', { timeout: 60_000 }, async () => {
    const restore = await receiverJson(['token', '--restore', '--expires', '3s']);
    const enrollment = await receiverJson(['token', '--expires', '3s']);
    for (const t of [restore, enrollment]) assert.ok(Math.abs(Date.parse(t.expiresAt) - Date.now() - 3000) < 2000, `expiresAt ${t.expiresAt}`);
    const points = () => runCli('restore', ['points', ...d.restoreArgs('web'), '--json'], { TIDEMARK_TOKEN: restore.token });
    const before = await points();
    assert.equal(before.code, 0, before.stderr);

    await new Promise((r) => setTimeout(r, Math.max(0, Date.parse(restore.expiresAt) - Date.now()) + 500));
    const after = await points();
    assert.equal(after.code, 6, after.stderr);
    assert.match(oneLine(after.stderr), /credential not recognized/);
    const late = await enroll(join(d.root, 'state-late'), 'late', enrollment.token);
    assert.equal(late.code, 6, late.stderr);
    assert.match(oneLine(late.stderr), /enrollment token unknown or already used \(or expired/);
    const listed = (await receiverJson<{ tokens: any[] }>(['token', '--list'])).tokens.find((t) => t.id === tokenId(enrollment.token));
    assert.deepEqual([listed.expiresAt, listed.usedAt], [enrollment.expiresAt, null]);
    assert.match((await receiverCli(['token', '--list'])).stdout, new RegExp(`${tokenId(enrollment.token)} .*unused  expired ${enrollment.expiresAt}`));
  });

  it('says what is wrong with a revocation or token request', async () => {
    const cases: Array<[string[], number, RegExp]> = [
      [['revoke'], 2, /say what to revoke: --host NAME or --token ID/],
      [['revoke', '--token', 'tmrestore_secret'], 2, /invalid token id .*16-digit id that tidemark-receiver token --list shows/],
      [['revoke', '--token', '0123456789abcdef'], 9, /no token with id 0123456789abcdef/],
      [['revoke', '--host', 'nobody'], 9, /no host named "nobody" is enrolled/],
      [['token', '--host', 'nobody'], 9, /no host named "nobody" is enrolled/],
      [['token', '--restore', '--host', 'web'], 2, /cannot be used with/],
      [['token', '--expires', '0s'], 2, /--expires 0s: give a duration longer than zero/],
      [['token', '--expires', 'soon'], 2, /invalid duration "soon"/],
    ];
    for (const [args, code, message] of cases) {
      const r = await receiverCli(args);
      assert.equal(r.code, code, `${args.join(' ')}: ${r.stderr}`);
      assert.match(oneLine(r.stderr), message, args.join(' '));
    }
  });
});
