// A client that pipelines requests and does not read the replies (hostile, or on a
// slow link) must not grow the receiver's memory: a chunks.get request of ~2 KiB
// asks for ~1 MiB of reply, and replies the socket cannot take wait in the
// receiver's memory. The receiver stops reading that session's requests while
// MAX_UNSENT_REPLY_BYTES of replies wait (receiver/session.ts); once the client
// reads again, every reply arrives. A real receiver, a real restore token.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import WebSocket from 'ws';
import { Packr } from 'msgpackr/pack';
import { connectPinned } from '../shared/connection.js';
import { MAX_FRAME_BYTES, MAX_IDS_PER_GET, PROTOCOL_HEADER, SESSION_PATH, encodeFrame } from '../shared/protocol.js';
import { Deployment } from './harness.js';
import { listPoints, restoreSession, vaultKeys } from './point-check.js';

const MiB = 1024 * 1024;
/** Each asks for ~1 MiB (15 envelopes of 64 KiB of random data): ~600 MiB of replies in all. */
const REQUESTS = 600;
/** Far below the ~600 MiB the replies would take if the receiver kept reading requests. */
const RSS_GROWTH_LIMIT_BYTES = 128 * MiB;

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' });

function rssBytes(pid: number): number {
  return Number(/VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;
}

describe('a client that does not read its replies', () => {
  let d: Deployment;
  let ids: Buffer[];

  before(async () => {
    d = await Deployment.start();
    await d.enroll('web1');
    const image = join(d.root, 'web1.img');
    writeFileSync(image, randomBytes(8 * MiB)); // incompressible: every envelope is a full block
    await d.syncOnce('web1', [image]);
    const keys = vaultKeys(d.keyFile);
    const conn = await restoreSession(d, keys);
    try {
      const [point] = await listPoints(conn, 'web1');
      const map = await conn.request('point.map', { pointId: point!.id, diskId: point!.disks[0]!.diskId, fromBlock: 0, limit: 8192 });
      ids = map.ids.slice(0, MAX_IDS_PER_GET);
    } finally {
      conn.close();
    }
  });
  after(() => d?.close());

  it('does not grow the receiver\'s memory; every reply arrives once it reads', { timeout: 120_000 }, async () => {
    const keys = vaultKeys(d.keyFile);
    const socket = await connectPinned(new URL(d.receiver.url), d.receiver.fingerprint);
    const ws = new WebSocket(new URL(SESSION_PATH, d.receiver.url), {
      createConnection: () => socket,
      headers: { authorization: `Bearer ${d.restoreToken}`, [PROTOCOL_HEADER]: '1' },
      perMessageDeflate: false,
      maxPayload: MAX_FRAME_BYTES,
    });
    await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
    const replies: any[] = [];
    let arrived: () => void = () => {};
    ws.on('message', (data: Buffer) => {
      replies.push(packr.unpack(data));
      arrived();
    });
    try {
      ws.send(encodeFrame({ t: 'hello', rid: 0, vaultId: keys.vaultId, vaultProof: keys.vaultProof }));
      await new Promise<void>((resolve) => (arrived = resolve));
      assert.equal(replies[0].t, 'ok', JSON.stringify(replies[0]));

      const before = rssBytes(d.receiver.pid);
      ws.pause(); // reads nothing from now on; the requests still go out
      for (let rid = 1; rid <= REQUESTS; rid++) ws.send(encodeFrame({ t: 'chunks.get', rid, ids }));
      let max = before;
      for (let i = 0; i < 40; i++) {
        await new Promise((r) => setTimeout(r, 100));
        max = Math.max(max, rssBytes(d.receiver.pid));
      }
      assert.ok(max - before < RSS_GROWTH_LIMIT_BYTES,
        `the receiver's RSS grew by ${((max - before) / MiB).toFixed(0)} MiB while the client read nothing (limit ${RSS_GROWTH_LIMIT_BYTES / MiB} MiB)`);

      const all = new Promise<void>((resolve) => (arrived = () => replies.length === REQUESTS + 1 && resolve()));
      ws.resume();
      await all;
      const failed = replies.slice(1).filter((r) => r.t !== 'ok' || r.data.length === 0);
      assert.equal(failed.length, 0, `every chunks.get answered with chunks: ${JSON.stringify(failed[0])?.slice(0, 300)}`);
      assert.equal(new Set(replies.slice(1).map((r) => r.rid)).size, REQUESTS, "one reply per request");
    } finally {
      ws.terminate();
    }
  });
});
