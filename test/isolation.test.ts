// Isolation between hosts and vaults (SPEC §10), through real processes: hosts
// A and B share one key file (one vault), host C has its own. A host reads and
// writes only its own points; chunks are shared within a vault and nowhere
// else; a vault id alone opens nothing (hello must carry the vault proof); and
// swapping two stored ciphertexts fails restore authentication.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { openKeyFile } from '../shared/keyfile.js';
import { encodeEntryHeader, ENTRY_HEADER_BYTES } from '../receiver/pack-store.js';
import { proofHash } from '../receiver/vault-proof.js';
import { Deployment, PASSPHRASE, runCli, runJson } from './harness.js';
import { RawClient, type RawReply } from './raw-client.js';
import { sha256File, writeMixedImage } from './fixtures.js';
import { readAt, writeAt } from './file-bytes.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;

function assertError(reply: RawReply, code: string, message?: RegExp): void {
  assert.equal(reply.t, 'error', `expected ${code}, got ${JSON.stringify(reply).slice(0, 300)}`);
  assert.equal(reply.code, code, reply.message);
  if (message) assert.match(reply.message!, message);
}

describe('isolation between hosts and vaults', () => {
  let d: Deployment;
  let keyC: string;
  let keysAB: VaultKeys;
  let keysC: VaultKeys;
  const disks: Record<string, string> = {};
  const creds: Record<string, string> = {};
  const synced: Record<string, any> = {};
  const diskIds: Record<string, number> = {};
  let shaAtPoint: string;

  /** Read-only queries on the catalog beside the running receiver. */
  function catalog<T>(sql: string, ...params: unknown[]): T[] {
    const db = new Database(join(d.receiver.dataDir, 'catalog.db'), { readonly: true });
    try {
      return db.prepare(sql).all(...params) as T[];
    } finally {
      db.close();
    }
  }

  const session = async (secret: string, keys?: VaultKeys): Promise<RawClient> => {
    const c = await RawClient.open(d.receiver.url, d.receiver.fingerprint, secret);
    if (keys) assert.equal((await c.request('hello', { vaultId: keys.vaultId, vaultProof: keys.vaultProof })).t, 'ok');
    return c;
  };

  before(async () => {
    d = await Deployment.start();
    keyC = join(d.root, 'vault-c.key');
    for (const [host, keyFile] of [['host-a', d.keyFile], ['host-b', d.keyFile], ['host-c', keyC]] as const) {
      const state = await d.enroll(host, keyFile);
      creds[host] = readFileSync(join(state, 'credential'), 'utf8').trim();
      disks[host] = join(d.root, `${host}.img`);
    }
    keysAB = VaultKeys.fromMaster(openKeyFile(d.keyFile, PASSPHRASE));
    keysC = VaultKeys.fromMaster(openKeyFile(keyC, PASSPHRASE));
    assert.notEqual(keysAB.vaultId, keysC.vaultId);
    // All three disks hold the same bytes: only the vault decides what is shared.
    await writeMixedImage(disks['host-a']!, 8 * MiB, 21);
    copyFileSync(disks['host-a']!, disks['host-b']!);
    copyFileSync(disks['host-a']!, disks['host-c']!);
    shaAtPoint = await sha256File(disks['host-a']!);
    for (const host of ['host-a', 'host-b', 'host-c']) synced[host] = await d.syncOnce(host, [disks[host]!]);
    for (const row of catalog<{ host: string; id: number }>(`SELECT h.name AS host, d.id FROM disk d JOIN host h ON h.id = d.host_id`)) diskIds[row.host] = row.id;
  });
  after(() => d?.close());

  it('hosts of one vault share chunks; another vault shares none', async () => {
    const [a, b, c] = [synced['host-a'], synced['host-b'], synced['host-c']];
    assert.ok(a.chunksUploaded > 0);
    assert.equal(b.chunksUploaded, 0, 'B, in A\'s vault, uploads nothing for the same image');
    assert.equal(b.chunksDeduplicated, a.chunksUploaded);
    assert.equal(c.chunksUploaded, a.chunksUploaded, 'C, in another vault, uploads every chunk again');
    assert.equal(c.chunksDeduplicated, 0);
    const perVault = catalog<{ vault: string; n: number }>(`SELECT n.vault_id AS vault, COUNT(*) AS n FROM chunk c JOIN vault_number n ON n.number = c.vault GROUP BY n.vault_id ORDER BY n.vault_id`);
    assert.deepEqual(perVault.map((r) => r.n), [a.chunksUploaded, a.chunksUploaded]);
    // The same plaintext has different ids in the two vaults.
    const ids = (vault: string) => new Set(catalog<{ id: Buffer }>(`SELECT c.id FROM chunk c JOIN vault_number n ON n.number = c.vault WHERE n.vault_id = ?`, vault).map((r) => r.id.toString('hex')));
    const inAB = ids(keysAB.vaultId);
    assert.equal([...ids(keysC.vaultId)].filter((id) => inAB.has(id)).length, 0);
  });

  it('a host credential lists and restores only its own host', async () => {
    const asA = { TIDEMARK_TOKEN: creds['host-a'] };
    const own = await runJson<{ points: any[] }>('restore', ['points', ...d.restoreArgs('host-a')], asA);
    assert.deepEqual(own.points.map((p) => p.id), [synced['host-a'].pointId]);
    const all = await runJson<{ points: any[] }>('restore', ['points', '--receiver', d.receiver.url, '--fingerprint', d.receiver.fingerprint, '--key-file', d.keyFile], asA);
    assert.deepEqual(all.points.map((p) => p.host), ['host-a'], 'without --host, A sees only its own points');

    const list = await runCli('restore', ['points', ...d.restoreArgs('host-b')], asA);
    assert.equal(list.code, 6, list.stderr);
    assert.match(list.stderr, /only its own host's points, not host-b's/);

    const out = join(d.root, 'stolen-b.img');
    const restore = await runCli('restore', ['disk', ...d.restoreArgs('host-b'), '--disk', disks['host-b']!, '--point', String(synced['host-b'].pointId), '--to', out], asA);
    assert.equal(restore.code, 6, restore.stderr);
    assert.equal(existsSync(out), false, 'nothing was written');
  });

  it('point.map of another host\'s point is not found', async () => {
    const a = await session(creds['host-a']!, keysAB);
    try {
      const mine = await a.request('point.map', { pointId: synced['host-a'].pointId, diskId: diskIds['host-a'], fromBlock: 0, limit: 8192 });
      assert.equal(mine.t, 'ok');
      assert.ok(mine.ids.length > 0);
      for (const diskId of [diskIds['host-b'], diskIds['host-a']]) {
        assertError(await a.request('point.map', { pointId: synced['host-b'].pointId, diskId, fromBlock: 0, limit: 8192 }), 'E_NOT_FOUND', /no point .* that this credential may read/);
      }
      // C's point, in another vault, likewise.
      assertError(await a.request('point.map', { pointId: synced['host-c'].pointId, diskId: diskIds['host-c'], fromBlock: 0, limit: 10 }), 'E_NOT_FOUND');
    } finally {
      a.close();
    }
  });

  it('blocks.put and point.commit of another host\'s point or disk fail; its points stay as they were', async () => {
    const b = await session(creds['host-b']!, keysAB);
    const a = await session(creds['host-a']!, keysAB);
    try {
      const openB = await b.request('point.begin', { resume: null });
      assert.equal(openB.t, 'ok');
      const openA = await a.request('point.begin', { resume: null });
      assert.equal(openA.t, 'ok');
      const [chunkOfA] = (await a.request('point.map', { pointId: synced['host-a'].pointId, diskId: diskIds['host-a'], fromBlock: 0, limit: 8192 })).ids;
      const put = (pointId: number, diskId: number) => a.request('blocks.put', { pointId, diskId, blocks: [0], ids: [chunkOfA] });
      const commit = (pointId: number, diskId: number) => a.request('point.commit', { pointId, timeMs: Date.now(), crashConsistent: true, disks: [{ diskId, changedBytes: BLOCK }] });

      assertError(await put(openB.pointId, diskIds['host-b']!), 'E_CONFLICT', /not open for this host/);
      assertError(await put(openB.pointId, diskIds['host-a']!), 'E_CONFLICT');
      assertError(await put(synced['host-b'].pointId, diskIds['host-b']!), 'E_CONFLICT');
      assertError(await put(openA.pointId, diskIds['host-b']!), 'E_FORBIDDEN', /does not belong to this host/);
      assertError(await commit(openB.pointId, diskIds['host-b']!), 'E_CONFLICT');
      assertError(await commit(synced['host-b'].pointId, diskIds['host-b']!), 'E_CONFLICT');
      assertError(await commit(openA.pointId, diskIds['host-b']!), 'E_FORBIDDEN', /does not belong to this host/);

      const staged = catalog<{ n: number }>(`SELECT COUNT(*) AS n FROM block_version WHERE point_id IN (?, ?)`, openA.pointId, openB.pointId)[0]!.n;
      assert.equal(staged, 0, 'nothing was staged');
      const states = catalog<{ id: number; state: string }>(`SELECT id, state FROM point WHERE id IN (?, ?) ORDER BY id`, openA.pointId, openB.pointId);
      assert.deepEqual(states.map((s) => s.state), ['open', 'open'], 'neither point was committed');
    } finally {
      a.close();
      b.close();
    }
    const pointsB = await d.points('host-b');
    assert.deepEqual(pointsB.map((p) => p.id), [synced['host-b'].pointId]);
  });

  it('another vault cannot fetch, find or reference a chunk, guessed ids included', async () => {
    const a = await session(creds['host-a']!, keysAB);
    const idsOfA: Buffer[] = (await a.request('point.map', { pointId: synced['host-a'].pointId, diskId: diskIds['host-a'], fromBlock: 0, limit: 8192 })).ids;
    a.close();
    const guessed = [randomBytes(32), randomBytes(32)];
    const sample = [...idsOfA.slice(0, 4), ...guessed];

    const c = await session(creds['host-c']!, keysC);
    try {
      for (const id of sample) assertError(await c.request('chunk.get', { id }), 'E_NOT_FOUND', /not stored in this vault/);
      assertError(await c.request('chunks.get', { ids: sample }), 'E_NOT_FOUND', /not stored in this vault/);
      // C's own chunk first: the reply stops before A's.
      const idsOfC: Buffer[] = (await c.request('point.map', { pointId: synced['host-c'].pointId, diskId: diskIds['host-c'], fromBlock: 0, limit: 8192 })).ids;
      const mixed = await c.request('chunks.get', { ids: [idsOfC[0], ...sample] });
      assert.equal(mixed.t, 'ok', mixed.message);
      assert.equal(mixed.data.length, 1);
      const query = await c.request('chunks.query', { ids: idsOfA });
      assert.deepEqual(query.missing, idsOfA.map((_, i) => i), 'every chunk of A is missing from C\'s vault');
      const open = await c.request('point.begin', { resume: null });
      assert.equal(open.t, 'ok');
      assertError(await c.request('blocks.put', { pointId: open.pointId, diskId: diskIds['host-c'], blocks: [0, 1], ids: idsOfA.slice(0, 2) }), 'E_NOT_FOUND', /not stored/);
      assertError(await c.request('blocks.put', { pointId: open.pointId, diskId: diskIds['host-c'], blocks: [0], ids: [guessed[0]] }), 'E_NOT_FOUND', /not stored/);
      assert.equal(catalog<{ n: number }>(`SELECT COUNT(*) AS n FROM block_version WHERE point_id = ?`, open.pointId)[0]!.n, 0, 'nothing staged');
      // C's credential cannot enter A's vault either.
      assertError(await c.request('hello', { vaultId: keysAB.vaultId, vaultProof: keysC.vaultProof }), 'E_FORBIDDEN', /enrolled with another key file/);
    } finally {
      c.close();
    }

    // Nor can a restore token that entered C's vault.
    const r = await session(d.restoreToken, keysC);
    try {
      for (const id of sample) assertError(await r.request('chunk.get', { id }), 'E_NOT_FOUND');
      assertError(await r.request('chunks.get', { ids: sample }), 'E_NOT_FOUND');
    } finally {
      r.close();
    }
  });

  it('a restore token with another vault\'s key file sees none of A\'s and B\'s points', async () => {
    const args = ['--receiver', d.receiver.url, '--fingerprint', d.receiver.fingerprint, '--key-file', keyC];
    const token = { TIDEMARK_TOKEN: d.restoreToken };
    const all = await runJson<{ points: any[] }>('restore', ['points', ...args], token);
    assert.deepEqual(all.points.map((p) => p.host), ['host-c']);
    // Another vault's host is unknown to this key file, as a name never enrolled is: nothing tells them apart.
    for (const host of ['host-a', 'host-b', 'host-never']) {
      const r = await runCli('restore', ['points', ...args, '--host', host], token);
      assert.equal(r.code, 9, r.stderr);
      assert.equal(r.stderr.trim(), `tidemark-restore: no host named "${host}" in this key file's vault on the receiver; ` +
        'tidemark-restore points without --host lists the hosts that have points (tidemark-receiver status, every host)');
    }
    const out = join(d.root, 'via-c.img');
    const r = await runCli('restore', ['disk', ...args, '--host', 'host-a', '--disk', disks['host-a']!, '--point', String(synced['host-a'].pointId), '--to', out], token);
    assert.equal(r.code, 9, r.stderr);
    assert.equal(existsSync(out), false);
  });

  it('hello needs the vault proof: a vault id alone opens nothing', async () => {
    const r = await session(d.restoreToken);
    try {
      assertError(await r.request('hello', { vaultId: keysAB.vaultId, vaultProof: keysC.vaultProof }), 'E_FORBIDDEN', new RegExp(`this key file does not belong to vault ${keysAB.vaultId}`));
      assertError(await r.request('hello', { vaultId: keysAB.vaultId, vaultProof: randomBytes(32) }), 'E_FORBIDDEN', /does not belong to vault/);
      assertError(await r.request('points.list', { host: null, afterId: null }), 'E_PROTOCOL', /before hello/);
      assertError(await r.request('hello', { vaultId: randomBytes(16).toString('hex'), vaultProof: randomBytes(32) }), 'E_NOT_FOUND', /holds no vault/);
      assertError(await r.request('chunk.get', { id: randomBytes(32) }), 'E_PROTOCOL', /before hello/);
      // A missing proof is a malformed hello: the session ends.
      assertError(await r.request('hello', { vaultId: keysAB.vaultId }), 'E_PROTOCOL', /vaultProof/);
      assert.equal(await r.closed, 1002);
    } finally {
      r.close();
    }
    const a = await session(creds['host-a']!);
    try {
      assertError(await a.request('hello', { vaultId: keysAB.vaultId, vaultProof: keysC.vaultProof }), 'E_FORBIDDEN', /does not belong to vault/);
    } finally {
      a.close();
    }
  });

  it('enroll needs the vault proof too; a refused enrollment leaves the token unused', async () => {
    const token = await d.receiver.token();
    const e = await RawClient.open(d.receiver.url, d.receiver.fingerprint, token, true);
    assertError(await e.request('enroll', { host: 'intruder', vaultId: keysAB.vaultId, vaultProof: keysC.vaultProof }), 'E_FORBIDDEN', /does not belong to vault/);
    e.close();
    assert.equal(catalog(`SELECT 1 FROM host WHERE name = 'intruder'`).length, 0);
    const again = await RawClient.open(d.receiver.url, d.receiver.fingerprint, token, true);
    const ok = await again.request('enroll', { host: 'host-e', vaultId: keysAB.vaultId, vaultProof: keysAB.vaultProof });
    assert.equal(ok.t, 'ok', 'the token was not consumed by the refused enrollment');
    again.close();

    // The receiver keeps a hash of each vault's proof, never the proof.
    const vaults = catalog<{ vault_id: string; proof_hash: Buffer }>(`SELECT vault_id, proof_hash FROM vault ORDER BY vault_id`);
    const expected = [keysAB, keysC].sort((x, y) => x.vaultId.localeCompare(y.vaultId));
    assert.deepEqual(vaults.map((v) => v.vault_id), expected.map((k) => k.vaultId));
    vaults.forEach((v, i) => assert.deepEqual(v.proof_hash, proofHash(expected[i]!.vaultProof)));
    for (const file of ['catalog.db', 'catalog.db-wal']) {
      const path = join(d.receiver.dataDir, file);
      if (!existsSync(path)) continue;
      const content = readFileSync(path);
      for (const k of [keysAB, keysC]) assert.equal(content.indexOf(k.vaultProof), -1, `vault proof stored in ${file}`);
    }
  });

  it('swapping two stored ciphertexts (checksums rewritten) fails restore authentication, naming the chunk', async () => {
    const raw = catalog<{ id: Buffer; file: string; offset: number; length: number }>(`
      SELECT c.id, p.file, c.offset, c.length FROM chunk c JOIN pack p ON p.id = c.pack_id JOIN vault_number n ON n.number = c.vault
      WHERE n.vault_id = ? AND c.length = ? AND c.id IN (SELECT chunk_id FROM block_version WHERE disk_id = ?)
      ORDER BY p.id, c.offset`, keysAB.vaultId, BLOCK + 52, diskIds['host-a']);
    assert.ok(raw.length >= 2, 'the image has incompressible blocks stored at equal length');
    const [x, y] = [raw[0]!, raw[1]!];
    const path = (c: typeof x) => join(d.receiver.dataDir, 'packs', c.file);
    const entryX = readAt(path(x), x.offset, ENTRY_HEADER_BYTES + x.length);
    const entryY = readAt(path(y), y.offset, ENTRY_HEADER_BYTES + y.length);
    const envX = entryX.subarray(ENTRY_HEADER_BYTES);
    const envY = entryY.subarray(ENTRY_HEADER_BYTES);
    writeAt(path(x), x.offset, Buffer.concat([encodeEntryHeader(x.id, envY), envY]));
    writeAt(path(y), y.offset, Buffer.concat([encodeEntryHeader(y.id, envX), envX]));
    try {
      const keyless = await runCli('receiver', ['verify', '--data', d.receiver.dataDir, '--json']);
      assert.equal(keyless.code, 0, `the key-less checks pass on the swapped store: ${keyless.stderr}`);

      const out = join(d.root, 'swapped.img');
      const r = await runCli('restore', ['disk', ...d.restoreArgs('host-a'), '--disk', disks['host-a']!, '--point', String(synced['host-a'].pointId), '--to', out], { TIDEMARK_TOKEN: d.restoreToken });
      assert.equal(r.code, 5, r.stderr);
      const named = new RegExp(`chunk (${x.id.toString('hex')}|${y.id.toString('hex')}) failed authentication`);
      assert.match(r.stderr, named);
      assert.equal(existsSync(out), false, 'no image is left behind');
    } finally {
      writeAt(path(x), x.offset, entryX);
      writeAt(path(y), y.offset, entryY);
    }
  });

  it('after all that, every host\'s point restores byte-identical', async () => {
    for (const host of ['host-a', 'host-b']) {
      const out = join(d.root, `${host}-final.img`);
      await d.restore(host, disks[host]!, synced[host].pointId, out);
      assert.equal(await sha256File(out), shaAtPoint);
    }
    const out = join(d.root, 'host-c-final.img');
    await runJson('restore', ['disk', '--receiver', d.receiver.url, '--fingerprint', d.receiver.fingerprint, '--key-file', keyC, '--host', 'host-c',
      '--disk', disks['host-c']!, '--point', String(synced['host-c'].pointId), '--to', out], { TIDEMARK_TOKEN: d.restoreToken });
    assert.equal(await sha256File(out), shaAtPoint);
  });
});
