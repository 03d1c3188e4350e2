// chunks.get and the restore's ChunkFetcher against a real receiver: a reply
// is a prefix of the ids asked for, bounded by MAX_GET_REPLY_BYTES and by the
// first chunk that cannot be read; the fetcher asks again for the rest, so a
// damaged chunk fails only itself, and the CLI restores the image exactly.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { ENTRY_HEADER_BYTES } from '../receiver/pack-store.js';
import { ChunkFetcher } from '../restore/chunk-fetcher.js';
import type { VaultKeys } from '../shared/chunk-crypto.js';
import { MAX_GET_REPLY_BYTES, MAX_IDS_PER_GET } from '../shared/protocol.js';
import { flipByte } from './file-bytes.js';
import { sha256File } from './fixtures.js';
import { Deployment, runCli } from './harness.js';
import { restoreSession, vaultKeys } from './point-check.js';
import { RawClient, type RawReply } from './raw-client.js';

const BLOCK = 64 * 1024;
const BLOCKS = 40;

function ok(reply: RawReply): RawReply {
  assert.equal(reply.t, 'ok', `expected ok, got ${JSON.stringify(reply).slice(0, 300)}`);
  return reply;
}

describe('chunks.get', () => {
  let d: Deployment;
  let disk: string;
  let pointId: number;
  let diskId: number;
  /** The point's chunk ids in block order: random blocks, so every one is distinct and stored raw. */
  let ids: Buffer[];
  let raw: RawClient;
  let keys: VaultKeys;

  const restoreTo = (to: string) => runCli('restore', ['disk', ...d.restoreArgs('fetch'), '--disk', disk, '--point', String(pointId), '--to', to], { TIDEMARK_TOKEN: d.restoreToken });

  before(async () => {
    d = await Deployment.start();
    await d.enroll('fetch');
    disk = join(d.root, 'random.img');
    writeFileSync(disk, randomBytes(BLOCKS * BLOCK));
    const point = await d.syncOnce('fetch', [disk]);
    pointId = point.pointId;
    raw = await RawClient.open(d.receiver.url, d.receiver.fingerprint, d.restoreToken);
    keys = vaultKeys(d.keyFile);
    const hello = ok(await raw.request('hello', { vaultId: keys.vaultId, vaultProof: keys.vaultProof }));
    // Restore batches only when the receiver lists chunks.get (SPEC §2); without it, it falls back to chunk.get silently.
    assert.deepEqual(hello.features, ['chunks.get']);
    const listed = ok(await raw.request('points.list', { host: 'fetch', afterId: null }));
    diskId = listed.points[0].disks[0].diskId;
    const map = ok(await raw.request('point.map', { pointId, diskId, fromBlock: 0, limit: 8192 }));
    ids = map.ids.map((id: Uint8Array) => Buffer.from(id));
    assert.equal(ids.length, BLOCKS);
  });
  after(async () => {
    raw?.close();
    await d?.close();
  });

  it('answers a prefix of the ids, as many envelopes as fit MAX_GET_REPLY_BYTES, each the one chunk.get returns', async () => {
    const asked = ids.slice(0, MAX_IDS_PER_GET);
    const reply = ok(await raw.request('chunks.get', { ids: asked }));
    const singly = await Promise.all(asked.map(async (id) => Buffer.from(ok(await raw.request('chunk.get', { id })).data)));
    const envelopeBytes = singly[0]!.length; // random blocks do not compress: every envelope is this long
    assert.ok(singly.every((e) => e.length === envelopeBytes));
    assert.equal(reply.data.length, Math.floor(MAX_GET_REPLY_BYTES / envelopeBytes), 'filled up to the byte budget and no further');
    assert.ok(reply.data.length < asked.length);
    reply.data.forEach((envelope: Uint8Array, i: number) => assert.ok(singly[i]!.equals(envelope), `envelope ${i} is the chunk asked for at ${i}`));
  });

  it('errs for the first id only: a later unreadable id ends the reply before it', async () => {
    const unknown = randomBytes(32);
    const first = await raw.request('chunks.get', { ids: [unknown, ids[0]] });
    assert.equal(first.code, 'E_NOT_FOUND', first.message);
    assert.match(first.message!, /not stored in this vault/);
    const later = ok(await raw.request('chunks.get', { ids: [ids[0], unknown, ids[1]] }));
    assert.equal(later.data.length, 1, 'stops before the chunk it cannot read');
  });

  it('refuses an empty or oversized batch as a protocol error', async () => {
    for (const asked of [[], Array.from({ length: MAX_IDS_PER_GET + 1 }, () => ids[0])]) {
      const client = await RawClient.open(d.receiver.url, d.receiver.fingerprint, d.restoreToken);
      try {
        const reply = await client.request('chunks.get', { ids: asked });
        assert.equal(reply.code, 'E_PROTOCOL');
        assert.match(reply.message!, /malformed chunks.get: ids/);
      } finally {
        client.close();
      }
    }
  });

  it('a damaged chunk fails only itself: the fetcher gets every other chunk, restore fails closed, then restores exactly once repaired', { timeout: 120_000 }, async () => {
    const db = new Database(join(d.receiver.dataDir, 'catalog.db'), { readonly: true });
    const victim = 7;
    const at = db.prepare('SELECT p.file, c.offset FROM chunk c JOIN pack p ON p.id = c.pack_id WHERE c.id = ?').get(ids[victim]) as { file: string; offset: number };
    db.close();
    const undo = flipByte(join(d.receiver.dataDir, 'packs', at.file), at.offset + ENTRY_HEADER_BYTES + 100);
    try {
      const conn = await restoreSession(d, keys);
      try {
        const stats = { bytesFetched: 0 };
        assert.ok(conn.supports('chunks.get'));
        const fetcher = new ChunkFetcher(conn, BLOCK, stats);
        const results = await Promise.allSettled(ids.map((id) => fetcher.get(id)));
        results.forEach((r, i) => {
          if (i === victim) {
            assert.equal(r.status, 'rejected');
            assert.match(String((r as PromiseRejectedResult).reason.message), /damaged \(checksum mismatch\)/);
          } else {
            assert.equal(r.status, 'fulfilled', `chunk ${i}: ${(r as PromiseRejectedResult).reason?.message}`);
          }
        });
        assert.ok(stats.bytesFetched > (BLOCKS - 1) * BLOCK, 'every other envelope was received');
      } finally {
        conn.close();
      }
      const failed = await restoreTo(join(d.root, 'damaged.img'));
      assert.notEqual(failed.code, 0);
      assert.match(failed.stderr, new RegExp(ids[victim]!.toString('hex')));
    } finally {
      undo();
    }
    const restored = join(d.root, 'restored.img');
    const result = await restoreTo(restored);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(await sha256File(restored), await sha256File(disk));
  });
});
